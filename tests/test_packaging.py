"""The package as the image installs it (`pip install .`, not editable): into a fresh virtualenv (no
system or shared site-packages, so an undeclared dependency is missing there), then run from another
folder with nothing real to connect to. And every import of the package is a declared dependency."""

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from migration_assets.core.settings import PACKAGE_ROOT, PROJECT_ROOT
from migration_assets.devstack.servers import free_port

PYPROJECT = PROJECT_ROOT / "pyproject.toml"

# Run by the fresh venv's python: imports every module (an undeclared dependency fails here) and
# finds the data files the code reads at run time inside the installed package.
CHECK_INSTALLED = r"""
import importlib, importlib.resources, importlib.util, json, pkgutil, sys
import yaml
import migration_assets
from migration_assets.core import instance, pools, schema

modules = [m.name for m in pkgutil.walk_packages(migration_assets.__path__, "migration_assets.")]
for name in modules:
    importlib.import_module(name)
print(json.dumps({
    "package": migration_assets.__file__, "modules": len(modules),
    "pools": pools.project_pool_limits(), "instance_config": sorted(yaml.safe_load(instance.INSTANCE_CONFIG.read_text())),
    "migrations": len(schema.available_migrations()),
    "dynalite": importlib.resources.files("migration_assets.devstack").joinpath("dynalite.js").is_file(),
    "compiled_parse": importlib.util.find_spec("migration_assets.atproto._fastrepo") is not None,
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the project installed from a copy of what the Dockerfile copies; its bin/."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    shutil.copytree(PACKAGE_ROOT, source / "migration_assets", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-input", str(source)],
                         capture_output=True, text=True, timeout=900, env=clean_env(root), cwd=root)
    assert pip.returncode == 0, f"pip install of the project failed:\n{pip.stdout[-3000:]}\n{pip.stderr[-5000:]}"
    return venv / "bin"


def clean_env(home: Path) -> dict[str, str]:
    """This environment without what would make the checkout or the shared venv importable, and with
    every service pointed at a closed loopback port: nothing here may need a database or AWS."""
    closed = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return env | {
        "DAGSTER_HOME": str(home), "MIGRATION_DATA_DIR": str(home / "data"),
        "MIGRATION_DATABASE_URL": f"postgresql://nobody@{closed}/nothing",
        "DAGSTER_POSTGRES_URL": f"postgresql+psycopg2://nobody@{closed}/nothing",
        "AWS_ENDPOINT_URL": f"http://{closed}", "AWS_DEFAULT_REGION": "us-east-1",
    }


def run_installed(bin_dir: Path, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing of it may be found from here
    elsewhere.mkdir(exist_ok=True)
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, timeout=600,
                          cwd=elsewhere, env=clean_env(elsewhere))


@pytest.mark.timeout(1200)
def test_installed_package_imports_everything_and_has_its_data_files(installed, tmp_path):
    result = run_installed(installed, "python", "-c", CHECK_INSTALLED, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(installed.parent), f"imported from {found['package']}, not the venv"
    assert found["modules"] > 50
    assert found["pools"]["atproto_blobs"] == 15
    assert {"storage", "run_coordinator", "concurrency"} <= set(found["instance_config"])
    assert found["migrations"] >= 1 and found["dynalite"]
    assert found["compiled_parse"], "the install built no migration_assets/atproto/_fastrepo.c (setup.py)"


@pytest.mark.timeout(1200)
def test_installed_commands_run_from_another_folder(installed, tmp_path):
    help_ = run_installed(installed, "migration-assets", "--help", tmp_path=tmp_path)
    assert help_.returncode == 0, help_.stderr[-5000:]
    assert "usage: migration-assets" in help_.stdout

    validate = run_installed(installed, "dagster", "definitions", "validate", "-m", "migration_assets.definitions",
                             tmp_path=tmp_path)
    output = validate.stdout + validate.stderr
    assert validate.returncode == 0, output[-5000:]
    assert "Validation successful" in output


# --- declared dependencies ---------------------------------------------------------------------------

def imported_top_level_names() -> dict[str, str]:
    """Each third-party top-level module the package imports (at any depth: lazy imports too), with
    one file that imports it."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "migration_assets":
                    found.setdefault(top, str(path.relative_to(PROJECT_ROOT)))
    return found


def declared_distributions() -> set[str]:
    """pyproject's dependencies, plus what their requested extras bring (psycopg[pool]: psycopg-pool)."""
    declared = set()
    for spec in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]:
        requirement = Requirement(spec)
        declared.add(canonicalize_name(requirement.name))
        for extra in requirement.extras:
            for dependency in map(Requirement, metadata.requires(requirement.name) or []):
                marker = dependency.marker
                if marker and marker.evaluate({"extra": extra}) and not marker.evaluate({"extra": ""}):
                    declared.add(canonicalize_name(dependency.name))
    return declared


def test_every_import_is_a_declared_dependency():
    providers = metadata.packages_distributions()
    declared = declared_distributions()
    undeclared = {}
    for module, where in imported_top_level_names().items():
        distributions = {canonicalize_name(d) for d in providers.get(module, [])}
        if not distributions & declared:
            undeclared[module] = f"{where} (distribution: {', '.join(sorted(distributions)) or 'not installed'})"
    assert not undeclared, "imported but not in pyproject's dependencies:\n" + "\n".join(
        f"  {module}, e.g. {where}" for module, where in sorted(undeclared.items()))
