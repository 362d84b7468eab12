"""Turning core results into what Dagster shows: check results and metadata."""

import warnings

import dagster as dg

from migration_assets.core.checks import CheckOutcome


def check_specs(
    asset_key: dg.AssetKey,
    names_and_descriptions: dict[str, str],
    partitions_def: dg.PartitionsDefinition,
    warn: frozenset[str] = frozenset(),
) -> list[dg.AssetCheckSpec]:
    """Checks per partition (so each range's result is kept and shown with its partition). ERROR
    checks are blocking: a failure fails the run, so nothing downstream trusts a broken range."""
    # Partitioned check specs are a preview in Dagster 1.13 (pinned in pyproject); without them the
    # results lose their partition, and the UI and API cannot tell one range's checks from another's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return [
            dg.AssetCheckSpec(
                name, asset=asset_key, description=description, blocking=name not in warn,
                partitions_def=partitions_def,
            )
            for name, description in names_and_descriptions.items()
        ]


def check_result(outcome: CheckOutcome) -> dg.AssetCheckResult:
    severity = dg.AssetCheckSeverity.WARN if outcome.severity == "WARN" else dg.AssetCheckSeverity.ERROR
    return dg.AssetCheckResult(
        check_name=outcome.name,
        passed=outcome.passed,
        severity=severity,
        description=outcome.summary,
        metadata={"summary": dg.MetadataValue.text(outcome.summary), **outcome.metadata},
    )


def step_retry_policy(max_retries: int, base_seconds: float) -> dg.RetryPolicy:
    """Dagster retries a whole step after `base_seconds` x 2^n with full jitter: the same shape as
    `core.backoff.Backoff`, kept by Dagster so a retry survives the process."""
    return dg.RetryPolicy(max_retries=max_retries, delay=base_seconds,
                          backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.FULL)
