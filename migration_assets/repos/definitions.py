import dagster as dg

from migration_assets.repos.assets import repo_ledger, repos
from migration_assets.repos.sensors import repo_sync

defs = dg.Definitions(assets=[repo_ledger, repos], sensors=[repo_sync])
