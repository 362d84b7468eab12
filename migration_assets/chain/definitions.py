import dagster as dg

from migration_assets.chain.assets import block_events, block_metadata
from migration_assets.chain.assets_scan import block_scan
from migration_assets.chain.sensors import chain_sync

defs = dg.Definitions(assets=[block_metadata, block_events, block_scan], sensors=[chain_sync])
