"""Turning core results into what Dagster shows: check results and metadata."""

import dagster as dg

from migration_assets.core.checks import CheckOutcome


def check_specs(asset_key: dg.AssetKey, names_and_descriptions: dict[str, str], warn: set[str] = frozenset()) -> list[dg.AssetCheckSpec]:
    """ERROR checks are blocking: a failure fails the run, so nothing downstream trusts a broken range."""
    return [
        dg.AssetCheckSpec(name, asset=asset_key, description=description, blocking=name not in warn)
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
