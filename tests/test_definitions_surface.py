"""The names Dagster keeps history under, against a checked-in snapshot (definitions_surface.json).

Asset keys, partitions definitions (a dynamic one's name is where its partitions live in the
instance), check names, pools, sensors, schedules and jobs: renaming any of them leaves a running
migration's materializations, partitions, check results, cursors or pool limits behind under the
old name. So a change here must be on purpose: regenerate the snapshot and commit it with the change.
"""

import json
import os
from pathlib import Path

import dagster as dg

from migration_assets.definitions import defs

SNAPSHOT = Path(__file__).with_name("definitions_surface.json")
REGENERATE = f"UPDATE_SURFACE=1 pytest {Path(__file__).relative_to(Path(__file__).parents[1])}"


def partitions(partitions_def: dg.PartitionsDefinition | None) -> dict | None:
    if partitions_def is None:
        return None
    if isinstance(partitions_def, dg.DynamicPartitionsDefinition):
        return {"dynamic": partitions_def.name}
    if isinstance(partitions_def, dg.StaticPartitionsDefinition):
        keys = partitions_def.get_partition_keys()
        return {"static": len(keys), "first": keys[0], "last": keys[-1]}
    if isinstance(partitions_def, dg.TimeWindowPartitionsDefinition):
        return {"time_window": partitions_def.cron_schedule, "start": partitions_def.start.isoformat(),
                "timezone": partitions_def.timezone}
    return {type(partitions_def).__name__: str(partitions_def)}


def live_surface() -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "partitions": partitions(node.partitions_def),
            "checks": sorted(check.name for check in node.check_keys),
            "pools": sorted(node.pools),
        }
    return {
        "assets": dict(sorted(assets.items())),
        "sensors": sorted(sensor.name for sensor in defs.sensors or []),
        "schedules": sorted(schedule.name for schedule in defs.schedules or []),
        # Named jobs only: Dagster's own asset jobs (__ASSET_JOB, ...) are not the project's names.
        "jobs": sorted(job.name for job in defs.resolve_all_job_defs() if not job.name.startswith("__")),
    }


def lines(surface: dict) -> set[str]:
    """One line per name, so a difference reads as what was added and what went away."""
    found = set()
    for asset, parts in surface["assets"].items():
        found.add(f"asset {asset}")
        found.add(f"asset {asset} partitions {json.dumps(parts['partitions'], sort_keys=True)}")
        found.update(f"asset {asset} check {check}" for check in parts["checks"])
        found.update(f"asset {asset} pool {pool}" for pool in parts["pools"])
    for kind in ("sensors", "schedules", "jobs"):
        found.update(f"{kind[:-1]} {name}" for name in surface[kind])
    return found


def test_definitions_surface_matches_the_snapshot():
    live = live_surface()
    if os.environ.get("UPDATE_SURFACE") == "1":
        SNAPSHOT.write_text(json.dumps(live, indent=2) + "\n")
        return
    assert SNAPSHOT.exists(), f"no snapshot {SNAPSHOT.name}: make it with `{REGENERATE}` and commit it"
    expected, actual = lines(json.loads(SNAPSHOT.read_text())), lines(live)
    gone, new = sorted(expected - actual), sorted(actual - expected)
    assert not gone and not new, (
        "the definitions' surface differs from tests/definitions_surface.json.\n"
        + "".join(f"  - {line}  (renamed or removed: its history stays under this name)\n" for line in gone)
        + "".join(f"  + {line}\n" for line in new)
        + f"If this is on purpose (and old names' history is dealt with), regenerate with `{REGENERATE}`"
        " and commit tests/definitions_surface.json with the change.")


def test_surface_lines_tell_each_kind_of_rename_apart():
    """The comparison sees each kind of rename (so the snapshot test can fail for each)."""
    base = live_surface()
    asset = next(name for name, parts in base["assets"].items() if parts["checks"] and parts["pools"])
    renames = {
        "asset": lambda s: s["assets"].update({asset + "_renamed": s["assets"].pop(asset)}),
        "check": lambda s: s["assets"][asset]["checks"].append("renamed_check"),
        "pool": lambda s: s["assets"][asset].update(pools=["other_pool"]),
        "partitions": lambda s: s["assets"][asset].update(partitions={"dynamic": "renamed_partitions"}),
        "sensor": lambda s: s["sensors"].append("renamed_sensor"),
        "schedule": lambda s: s["schedules"].append("renamed_schedule"),
        "job": lambda s: s["jobs"].append("renamed_job"),
    }
    for kind, rename in renames.items():
        changed = json.loads(json.dumps(base))
        rename(changed)
        assert lines(changed) != lines(base), f"a {kind} rename went unseen"
