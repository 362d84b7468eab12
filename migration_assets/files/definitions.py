import dagster as dg

from migration_assets.files.assets import copied_files, file_retries, migration_ranges
from migration_assets.files.schedules import files_pending_ranges, files_ranges_hourly, files_retries

defs = dg.Definitions(
    assets=[migration_ranges, copied_files, file_retries],
    schedules=[files_ranges_hourly, files_retries],
    sensors=[files_pending_ranges],
)
