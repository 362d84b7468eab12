"""Building block tables for tests and running the block asset against the test instance."""

import dagster as dg

from migration_assets.chain.assets import block_metadata
from migration_assets.chain.partitions import block_ranges
from migration_assets.chain.ranges import range_key
from migration_assets.chain.source import CANONICAL_RID
from migration_assets.definitions import shared_resources
from migration_assets.devstack.sample_chain import block_hash, block_item, write_items

TAG = 1


def canonical_pair(height: int, parent_height: int | None = None, branch: int = 0, **extra):
    """A block's hash item and its canonical copy, linked to the main chain below it."""
    parent = height - 1 if parent_height is None else parent_height
    block = block_item(
        TAG, height, block_hash(TAG, height, branch), hash=block_hash(TAG, height, branch),
        parent_hash=block_hash(TAG, parent), parent_height=parent, **extra,
    )
    return [block, {**block, "block_rid": {"S": CANONICAL_RID}}]


def orphan(height: int, branch: int, **extra):
    return block_item(
        TAG, height, block_hash(TAG, height, branch), hash=block_hash(TAG, height, branch),
        parent_hash=block_hash(TAG, height - 1), parent_height=height - 1, **extra,
    )


def skipped(height: int):
    return [block_item(TAG, height, "null", skipped=True), block_item(TAG, height, CANONICAL_RID, skipped=True)]


def linear_chain(start: int, end: int) -> list:
    return [item for h in range(start, end) for item in canonical_pair(h)]


def seed(client, table: str, items: list) -> None:
    write_items(client, table, items)


def materialize_range(instance: dg.DagsterInstance, start: int, end: int, **resource_overrides):
    key = range_key(start, end)
    instance.add_dynamic_partitions(block_ranges.name, [key])
    resources = {**shared_resources(), **resource_overrides}
    return dg.materialize(
        [block_metadata], partition_key=key, instance=instance, resources=resources, raise_on_error=False
    )


def materialization_metadata(result: dg.ExecuteInProcessResult) -> dict:
    [materialization] = result.asset_materializations_for_node(block_metadata.node_def.name)
    return {name: value.value for name, value in materialization.metadata.items()}


def check_outcomes(result: dg.ExecuteInProcessResult) -> dict:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """The step failures' messages, with their causes (where the user's error stands)."""
    return "\n".join(e.step_failure_data.error.to_string() for e in result.all_events if e.is_step_failure)


def materialize_events(instance: dg.DagsterInstance, start: int, end: int, tags=None, **resource_overrides):
    from migration_assets.chain.assets import block_events
    from migration_assets.chain.partitions import event_ranges

    key = range_key(start, end)
    instance.add_dynamic_partitions(event_ranges.name, [key])
    resources = {**shared_resources(), **resource_overrides}
    return dg.materialize(
        [block_events], partition_key=key, instance=instance, resources=resources, raise_on_error=False,
        tags=tags or {},
    )


def quick_sync_retries(monkeypatch, asset=None) -> None:
    """An asset's retry policy (the event asset's by default) with its waits cut from half minutes to
    milliseconds."""
    from migration_assets.chain.assets import SYNC_RETRY, block_events
    from migration_assets.core.dagster_glue import step_retry_policy

    monkeypatch.setattr((asset or block_events).op, "_retry_policy", step_retry_policy(SYNC_RETRY.max_retries, 0.01))


def step_retries(result) -> int:
    return len(retry_reasons(result))


def retry_reasons(result) -> list[str]:
    """Why each retry of a step was asked for: what a count of retries that differs from a test's hangs on."""
    return [e.event_specific_data.error.to_string() for e in result.all_events
            if e.event_type_value == "STEP_UP_FOR_RETRY"]
