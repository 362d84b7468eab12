import dagster as dg

from migration_assets.blobs.assets import blobs
from migration_assets.blobs.sensors import blob_migration_requests

defs = dg.Definitions(assets=[blobs], sensors=[blob_migration_requests])
