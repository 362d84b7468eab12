"""migration_assets: large data migrations as partitioned, resumable, verified Dagster assets."""
