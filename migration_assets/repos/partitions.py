"""Static hash-bucket partitions: REPO_BUCKETS of them (default 256), whatever the number of accounts."""

import dagster as dg

from migration_assets.repos.buckets import bucket_keys
from migration_assets.repos.settings import RepoSettings

repo_buckets = dg.StaticPartitionsDefinition(bucket_keys(RepoSettings.from_env().buckets))
