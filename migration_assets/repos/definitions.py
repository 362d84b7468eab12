import dagster as dg

from migration_assets.repos.assets import repo_ledger, repos
from migration_assets.repos.follow_assets import repo_stream
from migration_assets.repos.sensors import repo_follow, repo_sync

defs = dg.Definitions(assets=[repo_ledger, repos, repo_stream], sensors=[repo_sync, repo_follow])
