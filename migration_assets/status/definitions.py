"""The operator's view in Dagster: a `status/migration_status` asset refreshed by a schedule. Its float
metadata (percent done, rate per pipeline) is plotted by the UI across materializations: rate over time."""

import re

import dagster as dg

from migration_assets.core.checks import CheckOutcome
from migration_assets.core.dagster_glue import check_result
from migration_assets.core.resources import PostgresResource
from migration_assets.status import report
from migration_assets.status.collect import collect

MIGRATION_STATUS = dg.AssetKey(["status", "migration_status"])


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def status_metadata(statuses: list[report.PipelineStatus]) -> dict:
    metadata = {
        "progress": dg.MetadataValue.md(report.markdown(statuses)),
        "failures": dg.MetadataValue.md(report.failures_markdown(statuses)),
        "slowest_and_stuck": dg.MetadataValue.md(report.slowest_markdown(statuses)),
    }
    for status in statuses:
        metadata[f"{slug(status.pipeline)}_percent_done"] = dg.MetadataValue.float(round(status.percent, 2))
        metadata[f"{slug(status.pipeline)}_per_hour"] = dg.MetadataValue.float(status.per_hour)
    return metadata


def status_checks(statuses: list[report.PipelineStatus]) -> list[CheckOutcome]:
    stuck = [f"{s.pipeline}: {item}" for s in statuses for item in s.stuck]
    failing = [f"{s.pipeline}: {s.failure_count}" for s in statuses if s.failure_count]
    return [
        CheckOutcome("no_stuck_work", not stuck, "; ".join(stuck[:10]) or "nothing stuck", severity="WARN"),
        CheckOutcome("no_failing_items", not failing,
                     ("failing items: " + ", ".join(failing) + " (see the failures table)") if failing
                     else "no failing items", severity="WARN"),
    ]


@dg.asset(
    key=MIGRATION_STATUS, group_name="status", kinds={"postgres"},
    check_specs=[dg.AssetCheckSpec(name, asset=MIGRATION_STATUS) for name in ("no_stuck_work", "no_failing_items")],
    description="Every pipeline's progress (done / total, rate, ETA), failures with their reasons, and "
    "the slowest or stuck work. `migration-assets status` prints the same.",
)
def migration_status(context: dg.AssetExecutionContext, postgres: PostgresResource) -> dg.MaterializeResult:
    with postgres.connection() as conn:
        statuses = collect(context.instance, conn)
    context.log.info("\n" + report.text(statuses))
    return dg.MaterializeResult(
        metadata=status_metadata(statuses),
        check_results=[check_result(outcome) for outcome in status_checks(statuses)],
    )


migration_status_schedule = dg.ScheduleDefinition(
    name="migration_status_every_15_minutes",
    target=[MIGRATION_STATUS],
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Refreshes the operator's status view; its rates plot over time in the asset's view.",
)

defs = dg.Definitions(assets=[migration_status], schedules=[migration_status_schedule])
