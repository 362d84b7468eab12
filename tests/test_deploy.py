"""The deploy/ guide's settings, checked against Dagster itself: the instance configs through Dagster's
instance schema and as real instances on PostgreSQL, the pool limits through the real CLI, the
image's command by running it, and the guide's variable table against the code."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import dagster as dg
import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config
from dagster._core.run_coordinator import QueuedRunCoordinator

from migration_assets.core import embedded
from migration_assets.core.pools import POOLS_FILE
from migration_assets.core.settings import PROJECT_ROOT
from migration_assets.devstack.servers import free_port

DEPLOY = PROJECT_ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent
GUIDE = DEPLOY / "README.md"


# --- helpers ---------------------------------------------------------------------------------------

def instance_home(tmp_path: Path, config: dict) -> Path:
    home = tmp_path / f"home_{uuid.uuid4().hex[:8]}"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


def fresh_dagster_url(pg_server_url: str) -> str:
    return embedded.dagster_storage_url(embedded.database_url(pg_server_url, f"d_{uuid.uuid4().hex[:10]}"))


@pytest.fixture
def offline_aws(monkeypatch):
    """AWS settings for clients that must not reach AWS: any call goes to a closed loopback port."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")


def guide_table(heading: str) -> list[dict[str, str]]:
    """The first markdown table under `## {heading}` in the guide, as rows of cells by header."""
    section = GUIDE.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(header, row)) for row in rows]


# --- ECS -------------------------------------------------------------------------------------------

def test_ecs_instance_config_passes_dagster_schema():
    config, custom_class = dagster_instance_config(str(DEPLOY / "ecs"))
    assert custom_class is None
    assert config["storage"] == {"postgres": {"postgres_url": {"env": "DAGSTER_POSTGRES_URL"}}}
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert (config["run_launcher"]["module"], config["run_launcher"]["class"]) == ("dagster_aws.ecs", "EcsRunLauncher")
    assert config["concurrency"]["pools"] == {"granularity": "run", "default_limit": 4}
    assert config["run_retries"] == {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False}
    assert config["run_monitoring"]["enabled"] and config["run_monitoring"]["max_runtime_seconds"] == 21600


def test_ecs_instance_loads_with_the_ecs_run_launcher(pg_server_url, tmp_path, monkeypatch, offline_aws):
    """The file as the image carries it becomes a working instance on PostgreSQL, and dagster-aws
    accepts the launcher's config (EcsRunLauncher validates it against its own schema on load)."""
    from dagster_aws.ecs import EcsRunLauncher
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager

    home = tmp_path / "ecs_home"
    home.mkdir()
    shutil.copyfile(DEPLOY / "ecs" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", fresh_dagster_url(pg_server_url))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, EcsRunLauncher)
        assert launcher.container_name == "run"
        secret_names = {secret["name"] for secret in launcher.secrets}
        assert {"DAGSTER_POSTGRES_URL", "MIGRATION_DATABASE_URL", "MIGRATION_SECRET_KEY"} <= secret_names
        assert launcher.secrets_tags == []  # only the listed secrets, not every "dagster"-tagged one
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert isinstance(instance.compute_log_manager, S3ComputeLogManager)
        assert instance.run_retries_max_retries == 2
        assert not instance.run_retries_retry_on_asset_or_op_failure
        assert instance.run_monitoring_max_runtime_seconds == 21600
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 40
        assert instance.event_log_storage.supports_global_concurrency_limits


# --- Kubernetes (Helm values) ----------------------------------------------------------------------

def render_chart_instance(values: dict, namespace: str = "dagster") -> dict:
    """The instance dagster.yaml that Dagster's Helm chart renders from these values
    (templates/configmap-instance.yaml and templates/helpers/instance/*.tpl), for the keys the
    project's values use. There is no helm binary here, so this follows the templates by hand;
    `helm template` is the check to run where helm exists."""
    pg = values["postgresql"]
    storage = {"postgres_db": {
        "username": pg["postgresqlUsername"], "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": pg["postgresqlHost"], "db_name": pg["postgresqlDatabase"],
        "port": pg["service"]["port"], "params": pg.get("postgresqlParams", {}),
    }}
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    run_k8s = k8s.get("runK8sConfig", {})
    launcher_config = {
        "load_incluster_config": k8s["loadInclusterConfig"], "job_namespace": k8s.get("jobNamespace") or namespace,
        "image_pull_policy": k8s["imagePullPolicy"], "service_account_name": "dagster",
        "dagster_home": {"env": "DAGSTER_HOME"}, "instance_config_map": {"env": "DAGSTER_K8S_INSTANCE_CONFIG_MAP"},
        "postgres_password_secret": {"env": "DAGSTER_K8S_PG_PASSWORD_SECRET"},
        "env_config_maps": [{"env": "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP"}],
        "env_secrets": [secret["name"] for secret in k8s.get("envSecrets", [])],
        "run_k8s_config": {
            "container_config": run_k8s.get("containerConfig", {}), "pod_spec_config": run_k8s.get("podSpecConfig", {}),
            "job_spec_config": run_k8s.get("jobSpecConfig", {}),
        },
    }
    daemon = values["dagsterDaemon"]
    monitoring, retries, conc = daemon["runMonitoring"], daemon["runRetries"], values["concurrency"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    return {
        "scheduler": {"module": "dagster.core.scheduler", "class": "DagsterDaemonScheduler"},
        **{key: {"module": module, "class": cls, "config": storage} for key, module, cls in [
            ("schedule_storage", "dagster_postgres.schedule_storage", "PostgresScheduleStorage"),
            ("run_storage", "dagster_postgres.run_storage", "PostgresRunStorage"),
            ("event_log_storage", "dagster_postgres.event_log", "PostgresEventLogStorage"),
        ]},
        "run_launcher": {"module": "dagster_k8s", "class": values["runLauncher"]["type"], "config": launcher_config},
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"},
        "run_monitoring": {
            "enabled": monitoring["enabled"], "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "max_resume_run_attempts": monitoring["maxResumeRunAttempts"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
            "free_slots_after_run_end_seconds": monitoring["freeSlotsAfterRunEndSeconds"],
            "max_runtime_seconds": monitoring["maxRuntimeSeconds"],
        },
        "run_retries": {"enabled": retries["enabled"], "max_retries": retries["maxRetries"],
                        "retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"]},
        "sensors": {"use_threads": daemon["sensors"]["useThreads"], "num_workers": daemon["sensors"]["numWorkers"]},
        "schedules": {"use_threads": daemon["schedules"]["useThreads"], "num_workers": daemon["schedules"]["numWorkers"]},
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
        "concurrency": {
            "pools": {"default_limit": conc["pools"]["defaultLimit"], "granularity": conc["pools"]["granularity"]},
            "runs": {"max_concurrent_runs": conc["runs"]["maxConcurrentRuns"]},
        },
    }


def k8s_values() -> dict:
    return yaml.safe_load((DEPLOY / "k8s" / "values.yaml").read_text())


@pytest.fixture(scope="module")
def dagster_k8s(tmp_path_factory) -> Path:
    """dagster-k8s of this Dagster release, with the kubernetes client it imports, installed from PyPI
    into a folder of its own: it is not a project dependency (it runs in the chart's images). Neither
    helm nor Dagster's chart (nor its values.schema.json) ships in a package of PyPI, npm or Debian
    (dagster-k8s's wheel holds only Python), so the launcher's own config schema is what checks the
    chart's run launcher section."""
    target = tmp_path_factory.mktemp("dagster_k8s")
    libraries = importlib.metadata.version("dagster-postgres")  # the integrations' version of this Dagster
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--target", str(target), f"dagster-k8s=={libraries}", *K8S_CLIENT], check=True, timeout=300)
    return target


K8S_CLIENT = ("kubernetes", "durationpy", "websocket-client", "requests-oauthlib", "oauthlib", "google-auth")
CHECK_LAUNCHER_CONFIG = """
import json, sys
from dagster._config import process_config, resolve_to_config_type
from dagster_k8s import K8sRunLauncher
result = process_config(resolve_to_config_type(K8sRunLauncher.config_type()), json.load(sys.stdin))
print(json.dumps([error.message for error in result.errors or []]))
"""


def k8s_launcher_config_errors(config: dict, dagster_k8s: Path) -> list[str]:
    """dagster-k8s's K8sRunLauncher config schema on this config (the env vars the chart sets, set)."""
    env = {**os.environ, "PYTHONPATH": str(dagster_k8s), **{name: "from-the-chart" for name in (
        "DAGSTER_HOME", "DAGSTER_K8S_INSTANCE_CONFIG_MAP", "DAGSTER_K8S_PG_PASSWORD_SECRET",
        "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP")}}
    result = subprocess.run([sys.executable, "-c", CHECK_LAUNCHER_CONFIG], input=json.dumps(config), env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)


def test_k8s_values_render_to_a_valid_instance_config(tmp_path, dagster_k8s):
    values = k8s_values()
    assert values["postgresql"]["enabled"] is False and values["generatePostgresqlPasswordSecret"] is False
    assert values["global"]["postgresqlSecretName"]
    assert values["concurrency"]["enabled"] is True

    rendered = render_chart_instance(values)
    config, _ = dagster_instance_config(str(instance_home(tmp_path, rendered)))
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"] == {"default_limit": 4, "granularity": "run"}
    assert config["run_retries"]["retry_on_asset_or_op_failure"] is False
    assert config["run_monitoring"]["max_runtime_seconds"] == 21600
    assert k8s_launcher_config_errors(rendered["run_launcher"]["config"], dagster_k8s) == []
    wrong = {**rendered["run_launcher"]["config"], "job_namespace": 5, "run_k8s_config": {"pod_spec": {}}}
    assert len(k8s_launcher_config_errors(wrong, dagster_k8s)) == 2  # the schema does reject


def test_k8s_run_launcher_section_structurally():
    # dagster-k8s is not a dependency of this project (it lives in the chart's own images), so
    # K8sRunLauncher's own config schema is not importable here: the section is checked by the
    # chart's value names and the launcher's module, class and keys instead.
    values = k8s_values()
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    allowed = {"image", "labels", "failPodOnRunFailure", "resources", "schedulerName", "securityContext",
               "runK8sConfig", "jobNamespace", "kubeconfigFile", "imagePullPolicy", "loadInclusterConfig",
               "envConfigMaps", "envSecrets", "envVars", "volumeMounts", "volumes"}
    assert set(k8s) <= allowed, set(k8s) - allowed
    assert set(k8s["runK8sConfig"]) <= {"containerConfig", "podSpecConfig", "podTemplateSpecMetadata",
                                        "jobSpecConfig", "jobMetadata"}
    assert k8s["runK8sConfig"]["jobSpecConfig"]["backoffLimit"] == 0
    launcher = render_chart_instance(values)["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert launcher["config"]["env_secrets"] == ["migration-assets-env"]

    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["codeServerArgs"] == ["-m", "migration_assets.definitions"]
    assert deployment["port"] == 4000 and deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert {"name": "migration-assets-env"} in deployment["envSecrets"]
    assert values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"] == {}


def test_k8s_rendered_instance_runs_on_postgres(pg_server_url, tmp_path, monkeypatch):
    """The rendered instance opens on a real PostgreSQL; only the connection coordinates are swapped
    for the embedded server's (the run launcher is never loaded: dagster-k8s is not installed)."""
    config = render_chart_instance(k8s_values())
    server = urlsplit(pg_server_url)
    socket_dir = parse_qs(server.query)["host"][0]
    database = embedded.database_url(pg_server_url, f"k_{uuid.uuid4().hex[:10]}").rsplit("/", 1)[1]
    for key in ("schedule_storage", "run_storage", "event_log_storage"):
        config[key]["config"]["postgres_db"].update(
            hostname="localhost", username=server.username, db_name=database, params={"host": socket_dir})
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", server.password or "")
    with dg.DagsterInstance.from_config(str(instance_home(tmp_path, config))) as instance:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert instance.run_retries_max_retries == 2
        assert instance.get_concurrency_config().pool_config.pool_granularity.value == "run"
        instance.event_log_storage.set_concurrency_slots("atproto_blobs", 15)
        assert instance.event_log_storage.get_concurrency_info("atproto_blobs").slot_count == 15


# --- pools -----------------------------------------------------------------------------------------

def test_pool_limits_are_documented_and_applied_by_set_pools(pg_server_url, tmp_path, monkeypatch, offline_aws):
    pools = yaml.safe_load(POOLS_FILE.read_text())
    assert pools["atproto_blobs"] == 15
    documented = {row["pool"]: int(row["limit"]) for row in guide_table("The run queue and pools")}
    assert documented == pools

    home = tmp_path / "pools_home"
    home.mkdir()
    shutil.copyfile(DEPLOY / "ecs" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_POSTGRES_URL": fresh_dagster_url(pg_server_url),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([str(DEPLOY / "set-pools.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", env["DAGSTER_POSTGRES_URL"])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        applied = {pool: instance.event_log_storage.get_concurrency_info(pool).slot_count for pool in pools}
    assert applied == pools


def test_every_pool_an_asset_names_has_a_limit():
    pools = yaml.safe_load(POOLS_FILE.read_text())
    named = set(re.findall(r"\bpool\s*=\s*\"(\w+)\"|\b\w*POOL\s*=\s*\"(\w+)\"", package_sources()))
    used = {name for pair in named for name in pair if name}
    assert "chain_dynamodb" in used
    assert used - set(pools) == set(), f"pools without a limit in {POOLS_FILE}: {used - set(pools)}"


# --- the image ---------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_installs_the_project_as_non_root():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [args for op, args in instructions if op == "RUN"]
    assert any(re.search(r"\bpip install \.(\s|$)", args) for args in runs), runs
    (user,) = [args for op, args in instructions if op == "USER"]
    assert user not in ("root", "0")
    assert ("EXPOSE", "4000") in instructions
    assert not [op for op, _ in instructions if op == "ENTRYPOINT"], "run launchers replace the command"

    ignored = {line.strip() for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    sources = [src for op, args in instructions if op == "COPY" for src in args.split()[:-1]]
    assert {"pyproject.toml", "setup.py", "migration_assets"} <= set(sources)
    for src in sources:
        assert (PROJECT_ROOT / src).exists(), f"COPY {src}: not in the checkout"
        assert src.split("/")[0] not in ignored, f"COPY {src}: excluded by .dockerignore"


def image_command() -> list[str]:
    (cmd,) = [args for op, args in dockerfile_instructions() if op == "CMD"]
    command = json.loads(cmd)  # exec form: a JSON array
    assert command[:3] == ["dagster", "code-server", "start"]
    assert command[command.index("-m") + 1] == "migration_assets.definitions"
    assert command[command.index("-p") + 1] == "4000"
    return command


def wait_for_code_server(process: subprocess.Popen, port: int, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"code server exited {process.returncode}:\n{log.read_text()[-3000:]}"
        check = subprocess.run([str(VENV_BIN / "dagster"), "api", "grpc-health-check", "-p", str(port)],
                               capture_output=True, timeout=60)
        if check.returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"code server not serving on {port} after {timeout} s:\n{log.read_text()[-3000:]}")


def test_image_command_serves_the_code_location(tmp_path, monkeypatch):
    """The CMD, run from the venv as the image runs it (host and port swapped for a free loopback
    port), serves the definitions; the ECS workspace pointed at it loads them as the webserver would."""
    command = image_command()
    port = free_port()
    command[command.index("-h") + 1] = "127.0.0.1"
    command[command.index("-p") + 1] = str(port)
    command[0] = str(VENV_BIN / command[0])
    log = tmp_path / "code-server.log"
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "MIGRATION_DATA_DIR": str(tmp_path / "data")}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_code_server(process, port, log)
        workspace = yaml.safe_load((DEPLOY / "ecs" / "workspace.yaml").read_text())
        (entry,) = workspace["load_from"]
        assert entry["grpc_server"]["port"] == 4000 and entry["grpc_server"]["location_name"] == "migration_assets"
        entry["grpc_server"].update(host="127.0.0.1", port=port)
        local = tmp_path / "workspace.yaml"
        local.write_text(yaml.safe_dump(workspace))
        assert_workspace_loads(local)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def assert_workspace_loads(workspace_file: Path) -> None:
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    with dg.instance_for_test() as instance, WorkspaceProcessContext(
        instance, WorkspaceFileTarget(paths=[str(workspace_file)])
    ) as process_context:
        context = process_context.create_request_context()
        assert context.get_code_location_error("migration_assets") is None
        location = context.get_code_location("migration_assets")
        (repository,) = location.get_repositories().values()
        asset_keys = {node.asset_key.to_user_string() for node in repository.get_asset_node_snaps()}
        assert "chain/block_metadata" in asset_keys


# --- the environment table -----------------------------------------------------------------------

def package_sources() -> str:
    return "\n".join(path.read_text() for path in (PROJECT_ROOT / "migration_assets").rglob("*.py"))


@cache
def settings_variables() -> frozenset[str]:
    """Every variable the project's settings models read (the models README's table is made from)."""
    from migration_assets.core.settings_table import settings_models

    return frozenset(name for model in settings_models() for name, _, _ in model.describe())


def reads_variable(sources: str, name: str) -> bool:
    return re.search(rf"[\"']{re.escape(name)}[\"']", sources) is not None or name in settings_variables()


def boto3_reads(name: str, monkeypatch) -> bool:
    """Whether boto3 picks the variable up (set to a marker value in a clean session)."""
    marker = "http://127.0.0.1:9" if name.startswith("AWS_ENDPOINT_URL_") else "marker-value"
    for var in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv(name, marker)
    session = boto3.session.Session()
    if name.startswith("AWS_ENDPOINT_URL_"):
        service = name.removeprefix("AWS_ENDPOINT_URL_").lower()
        return session.client(service).meta.endpoint_url == marker
    found = {"AWS_DEFAULT_REGION": lambda: session.region_name,
             "AWS_ACCESS_KEY_ID": lambda: session.get_credentials().access_key,
             "AWS_SECRET_ACCESS_KEY": lambda: session.get_credentials().secret_key}
    assert name in found, f"{name}: add a check of how boto3 reads it"
    return found[name]() == marker


def test_every_variable_in_the_guide_is_read_where_it_says(monkeypatch):
    rows = guide_table("Environment")
    sources = package_sources()
    assert len(rows) >= 10
    for row in rows:
        name, reader = row["variable"], row["read by"]
        if reader == "migration_assets":
            assert reads_variable(sources, name), f"{name}: the guide says migration_assets reads it; it does not"
        elif reader == "boto3":
            assert boto3_reads(name, monkeypatch), f"{name}: boto3 does not read it"
        else:
            raise AssertionError(f"{name}: unknown reader {reader!r}")


def test_every_project_variable_the_code_reads_is_in_the_guide():
    documented = {row["variable"] for row in guide_table("Environment")} | settings_variables()
    sources = package_sources()
    pattern = r"[\"']((?:MIGRATION|DAGSTER|CHAIN|ATPROTO|REPO|FILES)_[A-Z0-9_]+)[\"']"
    read = {name for name in {*re.findall(pattern, sources), *settings_variables()}
            if not name.startswith("DAGSTER_") or name in {"DAGSTER_HOME", "DAGSTER_POSTGRES_URL"}}
    assert read - documented == set(), (
        f"variables the code reads but neither deploy/README.md nor the settings models list: {read - documented}")


SECRET_KEY_SHAPE = re.compile(r"(?i).*(password|secret_access_key|secret_key|token)")


def secret_names() -> set[str]:
    return {row["variable"] for row in guide_table("Environment") if row["secret"] == "yes"}


def _literal(value: object) -> bool:
    """A value written out, as opposed to a reference (`{env: X}`, `valueFrom: arn`, a Secret's name)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip() != ""


def literal_secrets(node: object, secrets: set[str], where: str = "") -> list[str]:
    """Every place a parsed YAML document gives a secret a literal value: `NAME: value` keys, the
    ECS/Kubernetes `- name: NAME / value: literal` items, `NAME=value` strings (ECS env_vars), and
    password/secret-key/token keys whatever their name."""
    def is_secret(name: object) -> bool:
        return isinstance(name, str) and (name in secrets or SECRET_KEY_SHAPE.fullmatch(name) is not None)

    found = []
    if isinstance(node, dict):
        if is_secret(node.get("name")) and _literal(node.get("value")):
            found.append(f"{where}: {node['name']} = {node['value']!r}")
        for key, value in node.items():
            if is_secret(key) and _literal(value):
                found.append(f"{where}.{key} = {value!r}")
            found += literal_secrets(value, secrets, f"{where}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += literal_secrets(item, secrets, f"{where}[{index}]")
    elif isinstance(node, str) and "=" in node:
        name, value = node.split("=", 1)
        if is_secret(name.strip()) and _literal(value):
            found.append(f"{where}: {node!r}")
    return found


def test_the_secret_finder_catches_every_literal_form():
    secrets = {"MIGRATION_SECRET_KEY"}
    hostile = yaml.safe_load("""
ecs: {secrets: [{name: MIGRATION_SECRET_KEY, value: abc}], env_vars: [MIGRATION_SECRET_KEY=abc]}
k8s: {env: [{name: MIGRATION_SECRET_KEY, value: "0"}], envMap: {MIGRATION_SECRET_KEY: abc}}
storage: {postgres_db: {password: hunter2}}
""")
    assert len(literal_secrets(hostile, secrets)) == 5, literal_secrets(hostile, secrets)
    references = yaml.safe_load("""
secrets: [{name: MIGRATION_SECRET_KEY, valueFrom: "arn:aws:secretsmanager:r:1:secret:x"}]
env_vars: [CHAIN_BLOCK_TABLE, MIGRATION_SECRET_KEY]
postgres_db: {password: {env: DAGSTER_PG_PASSWORD}}
global: {postgresqlSecretName: dagster-postgresql-secret}
envSecrets: [{name: migration-assets-env}]
env: {MIGRATION_SECRET_KEY: ""}
""")
    assert literal_secrets(references, secrets) == []


def test_secrets_never_appear_as_values_in_deploy_configs():
    secrets = secret_names()
    assert {"MIGRATION_SECRET_KEY", "MIGRATION_DATABASE_URL", "AWS_SECRET_ACCESS_KEY"} <= secrets
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert {DEPLOY / "ecs" / "dagster.yaml", DEPLOY / "k8s" / "values.yaml"} <= set(files)
    for path in files:
        for document in yaml.safe_load_all(path.read_text()):
            assert literal_secrets(document, secrets) == [], f"{path.relative_to(DEPLOY)}: literal secret"
    for instruction, argument in dockerfile_instructions():
        if instruction in ("ENV", "ARG"):
            assignments = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", argument) or [tuple(argument.split(None, 1))]
            leaked = [name for name, *value in assignments if name in secrets and value]
            assert not leaked, f"Dockerfile {instruction} gives {leaked} a value: pass it at run time instead"
