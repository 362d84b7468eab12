"""scripts/setup skips `pip install` and `npm ci` when their inputs are unchanged since the last
successful install, on a copy of the script with logging stand-ins for python, npm and node."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

from migration_assets.core.settings import PROJECT_ROOT

LOGGER = '#!/usr/bin/env bash\necho "{name} $*" >>"{log}"\n{extra}'
C_SOURCE = "migration_assets/atproto/_fastrepo.c"  # setup.py builds it at the pip install


def _tool(path: Path, name: str, log: Path, extra: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LOGGER.format(name=name, log=log, extra=extra))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _checkout(tmp_path: Path) -> tuple[Path, Path, dict]:
    root, log, bin_dir = tmp_path / "checkout", tmp_path / "calls.log", tmp_path / "bin"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "scripts" / "setup", root / "scripts" / "setup")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    (root / C_SOURCE).parent.mkdir(parents=True)
    (root / C_SOURCE).write_text("/* the compiled parse */\n")
    (root / "package-lock.json").write_text('{"lockfileVersion": 3}\n')
    _tool(root / ".venv" / "bin" / "python", "pip", log)
    _tool(bin_dir / "npm", "npm", log, extra="mkdir -p node_modules\n")  # npm ci recreates node_modules
    _tool(bin_dir / "node", "node", log)
    return root, log, {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _installs(root: Path, log: Path, env: dict, *args: str) -> list[str]:
    log.write_text("")
    subprocess.run([str(root / "scripts" / "setup"), *args], cwd=root, env=env, check=True, capture_output=True)
    return sorted({line.split()[0] for line in log.read_text().splitlines()})


def test_second_setup_skips_installs_until_an_input_changes(tmp_path):
    root, log, env = _checkout(tmp_path)
    assert _installs(root, log, env) == ["npm", "pip"]
    assert _installs(root, log, env) == []
    (root / "package-lock.json").write_text('{"lockfileVersion": 3, "packages": {}}\n')
    assert _installs(root, log, env) == ["npm"]
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert _installs(root, log, env) == ["pip"]
    (root / C_SOURCE).write_text("/* the compiled parse, changed */\n")
    assert _installs(root, log, env) == ["pip"]
    shutil.rmtree(root / "node_modules")  # the stamp goes with the packages it describes
    assert _installs(root, log, env) == ["npm"]
    assert _installs(root, log, env, "--force") == ["npm", "pip"]


def test_a_failed_install_writes_no_stamp(tmp_path):
    root, log, env = _checkout(tmp_path)
    _tool(tmp_path / "bin" / "npm", "npm", log, extra="exit 1\n")
    result = subprocess.run([str(root / "scripts" / "setup")], cwd=root, env=env, capture_output=True)
    assert result.returncode != 0
    _tool(tmp_path / "bin" / "npm", "npm", log, extra="mkdir -p node_modules\n")
    assert _installs(root, log, env) == ["npm"]


def test_an_install_without_the_compiled_paths_warns_and_is_tried_again(tmp_path):
    root, log, env = _checkout(tmp_path)
    # A python whose compiled module does not import (`python -c "import ..."` fails): no compiler.
    _tool(root / ".venv" / "bin" / "python", "pip", log, extra='[ "$1" = "-c" ] && exit 1\nexit 0\n')
    result = subprocess.run([str(root / "scripts" / "setup")], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "compiled fast paths (setup.py) were not built" in result.stderr
    assert _installs(root, log, env) == ["pip"]  # npm's stamp was written, pip's was not
