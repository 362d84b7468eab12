import dagster as dg

from migration_assets.chain.assets import block_metadata

defs = dg.Definitions(assets=[block_metadata])
