"""The pure core imports without Dagster: protocol, readers, loaders, stores, ledgers, transfers,
movers and workers are plain Python, tested and reused without the Dagster shell around them.

The rule: every module of the package is core except the Dagster shell, which is the modules named
for a Dagster role (SHELL_ROLES, in any package, alone or as a part of the name: `follow_assets`) and
the few listed in SHELL_MODULES. A new module is
core unless it is one of those, so nothing slips out of the check by its name.
"""

import json
import pkgutil
import subprocess
import sys

import migration_assets

SHELL_ROLES = {"definitions", "assets", "sensors", "schedules", "partitions", "resources", "cli"}
SHELL_MODULES = {
    "migration_assets.core.dagster_glue",  # core results as Dagster check results
    "migration_assets.core.instance",  # the CLI's and the demo's Dagster instance
    "migration_assets.core.runs",  # the CLI's in-process runs
    "migration_assets.status.collect",  # reads the Dagster instance
    "migration_assets.chain.scan_report",  # a finished scan's ranges as materializations and check results
    "migration_assets.devstack.demo",  # starts `dagster dev`
    "migration_assets.devstack.demo_files",
    "migration_assets.devstack.demo_atproto",
}

# Run in a fresh interpreter: imports every core module with Dagster blocked, so each module that
# needs it fails with the chain of project imports that led there (all of them, not just the first).
CHILD = r"""
import importlib, json, sys, traceback

def dagster_name(name):
    return name == "dagster" or name.startswith(("dagster.", "dagster_"))

class DagsterBlocked(ImportError):
    pass

class BlockDagster:
    def find_spec(self, name, path=None, target=None):
        if dagster_name(name):
            chain = [f"{f.filename.rsplit('migration_assets/', 1)[-1]}:{f.lineno}"
                     for f in traceback.extract_stack()[:-1] if "/migration_assets/" in f.filename]
            raise DagsterBlocked(f"imports {name}: " + " -> ".join(chain))
        return None

sys.meta_path.insert(0, BlockDagster())
failures = {}
for module in json.loads(sys.argv[1]):
    try:
        importlib.import_module(module)
    except DagsterBlocked as error:
        failures[module] = str(error)
leaked = sorted(name for name in sys.modules if dagster_name(name))
print(json.dumps({"failures": failures, "leaked": leaked}))
"""


def package_modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(migration_assets.__path__, "migration_assets."))


def is_shell(module: str) -> bool:
    name = module.rsplit(".", 1)[-1]  # `assets`, or a role-named part: `follow_assets`, `assets_scan`
    return module in SHELL_MODULES or not SHELL_ROLES.isdisjoint(name.split("_"))


def core_modules() -> list[str]:
    return [module for module in package_modules() if not is_shell(module)]


def test_the_rule_covers_the_core_and_spares_the_shell():
    core = set(core_modules())
    # Spot checks, so a mistake in the rule cannot empty the check.
    assert {
        "migration_assets.atproto.xrpc", "migration_assets.atproto.identity", "migration_assets.core.postgres",
        "migration_assets.core.pools", "migration_assets.chain.loader", "migration_assets.chain.source",
        "migration_assets.repos.store", "migration_assets.repos.ledger", "migration_assets.repos.backfill",
        "migration_assets.blobs.transfer", "migration_assets.blobs.credentials", "migration_assets.files.mover",
        "migration_assets.files.worker", "migration_assets.files.s3client",
    } <= core
    assert not core & {"migration_assets.definitions", "migration_assets.core.resources", "migration_assets.chain.assets"}
    missing = SHELL_MODULES - set(package_modules())
    assert not missing, f"SHELL_MODULES names modules that no longer exist: {sorted(missing)}"


def test_core_modules_import_without_dagster():
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(core_modules())],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    problems = [f"  {module} {why}" for module, why in sorted(report["failures"].items())]
    assert not problems and not report["leaked"], (
        "these core modules need Dagster (move the Dagster part into the shell: a resources, assets, "
        "sensors or definitions module, or core/resources.py / core/dagster_glue.py):\n"
        + "\n".join(problems) + (f"\n  loaded anyway: {report['leaked']}" if report["leaked"] else ""))
