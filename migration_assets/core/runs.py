"""In-process runs for the `migration-assets` command: materialize a partition against the project's
instance (so the run shows in the UI) and print one line for it, its failed checks and its error."""

import gc
from collections.abc import Callable

import dagster as dg


def freeze_loaded_objects() -> None:
    """Call once a process that runs assets (a Dagster run's, the webserver's, the daemon's, the
    command's) has loaded the project: it keeps what the imports built for its whole life, so freeze
    that out of the collector's full passes. One such pass over Dagster's objects paused a file-copy run
    for ~0.17 s; in a repo backfill, whose parse keeps many objects alive for a while and so triggers full
    passes, they were a tenth of the process's CPU."""
    gc.freeze()


def materialize_partition(
    instance: dg.DagsterInstance, asset, key: str | None, resources: dict, command: str,
    run_config: dict | None = None, tags: dict[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [asset], partition_key=key, instance=instance, resources=resources, run_config=run_config,
        raise_on_error=False, tags={"migration-assets/cli": command, **(tags or {})},
    )


def materialized_metadata(result: dg.ExecuteInProcessResult, asset_key: dg.AssetKey) -> dict | None:
    """The plain metadata values of the run's last materialization of `asset_key`."""
    materializations = [
        event.event_specific_data.materialization
        for event in result.all_events
        if event.is_step_materialization and event.asset_key == asset_key
    ]
    if not materializations:
        return None
    return {name: value.value for name, value in materializations[-1].metadata.items()}


def print_partition_summary(
    key: str, asset_key: dg.AssetKey, result: dg.ExecuteInProcessResult, summary: Callable[[dict], str]
) -> bool:
    """One line for the partition, plus each failing check and error; True when all went well."""
    ok = result.success
    metadata = materialized_metadata(result, asset_key)
    if metadata is not None:
        print(f"{key}: " + summary(metadata))
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed:
            ok = ok and evaluation.severity.value == "WARN"
            print(f"  check {evaluation.check_name} FAILED ({evaluation.severity.value}): {evaluation.description}")
    for event in result.all_events:
        if event.is_step_failure:
            print(f"{key}: FAILED: {root_cause(event.step_failure_data.error)}")
    return ok


def root_cause(error) -> str:
    """The user's own error under Dagster's wrappers (a SerializableErrorInfo chain)."""
    while error is not None and error.cls_name and error.cls_name.startswith("Dagster") and error.cause:
        error = error.cause
    return error.message.strip() if error else "unknown error"
