"""Which workspace a target is (issue 13, items 3, 13 and 15): the host from the bundle, a profile, DATABRICKS_HOST or the
Databricks runtime, as the Databricks CLI and SDK find it; which Spark a command gets for it; and that `make` and the tests
stay in local workspaces whatever the shell says.

No Databricks workspace or cluster exists on this machine. What stands in, and why:
- a loopback HTTP server answers `GET /.well-known/databricks-config` (404) for the hosts of test profiles: databricks-sdk's
  `Config` probes it when it resolves a profile (out of reach it would retry for a second);
- a cluster is simulated by `DATABRICKS_RUNTIME_VERSION`, the variable Databricks runtimes set and serving_mlops reads;
  the runtime's own workspace URL (which the SDK reads from the notebook or job context) is not there to read;
- Databricks Connect cannot be installed beside pyspark (it ships its own), so one test injects a recorder of
  `DatabricksSession.builder` calls; the builder methods it records (`host`, `profile`, `getOrCreate`) were read from the
  databricks-connect 17.3.15 wheel.
Spark sessions are real (`local[1]`, and `local-cluster` for a multi-node master), each in its own process.
"""
import contextlib
import http.server
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import ROOT, cli

from serving_mlops.config import ConfigError, get_environment

BUNDLE = """
variables:
  catalog: {default: main}
  schema: {default: credit}
  landing_volume: {default: landing}
targets:
  bundled: {workspace: {host: "https://adb-1111111111111111.1.azuredatabricks.net"}}
  profiled: {workspace: {profile: ws-test}}
  plain: {}
"""
ENV_VARS = ("DATABRICKS_HOST", "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_RUNTIME_VERSION", "DATABRICKS_TOKEN",
            "DATABRICKS_CONFIG_FILE", "SERVING_MLOPS_HOME", "SERVING_MLOPS_BUNDLE", "SERVING_MLOPS_ENV")


class NotFound(http.server.BaseHTTPRequestHandler):
    "Answers every request with 404, as a workspace without host metadata does."
    def do_GET(self):
        self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def metadata_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown(); server.server_close()


@pytest.fixture
def laptop(tmp_path, monkeypatch, metadata_server):
    "A machine with nothing Databricks configured but a ~/.databrickscfg with a DEFAULT and a `ws-test` profile; returns the bundle."
    for var in ENV_VARS: monkeypatch.delenv(var, raising=False)
    cfg = tmp_path / "databrickscfg"
    cfg.write_text(f"[DEFAULT]\nhost = {metadata_server}/default\ntoken = dapi-default\n\n"
                   f"[ws-test]\nhost = {metadata_server}/ws-test\ntoken = dapi-ws-test\n\n"
                   f"[ws-other]\nhost = {metadata_server}/ws-other\ntoken = dapi-ws-other\n")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(cfg))
    monkeypatch.chdir(tmp_path)
    bundle = tmp_path / "databricks.yml"
    bundle.write_text(BUNDLE)
    return bundle


def sdk_host(**kwargs) -> str:
    "The host databricks-sdk itself resolves from `kwargs` and the environment (no authentication)."
    from databricks.sdk.config import Config
    from databricks.sdk.credentials_provider import CredentialsStrategy

    class HostOnly(CredentialsStrategy):
        def auth_type(self): return "host-only"
        def __call__(self, cfg): return lambda: {}
    return Config(**kwargs, credentials_strategy=HostOnly(), retry_timeout_seconds=1).host


# --- item 3: where the host comes from ---------------------------------------------------------------------------------

def test_a_laptop_with_nothing_configured_stays_local(laptop):
    "A DEFAULT profile alone (which the CLI would fall back to) does not turn the project's targets into workspaces."
    for target in ("dev", "staging", "prod"):
        env = get_environment(target)  # the project's own bundle
        assert env.is_local and env.root.parts[-2:] == (".mlops", target)
        assert env.describe().startswith(f"{target}: local workspace ")
    assert get_environment("plain", laptop).is_local


def test_host_from_the_bundle(laptop):
    env = get_environment("bundled", laptop)
    assert not env.is_local and env.root is None
    assert env.host == "https://adb-1111111111111111.1.azuredatabricks.net"
    assert env.describe() == "bundled: workspace https://adb-1111111111111111.1.azuredatabricks.net (host from the bundle) (catalog main, schema credit)"
    assert env.workspace.sdk_kwargs == {"host": env.host}
    assert (env.tracking_uri, env.registry_uri) == ("databricks", "databricks-uc")


def test_a_top_level_workspace_applies_to_every_target_and_a_targets_own_fields_win(laptop):
    "The CLI merges `targets.<t>.workspace` over the top-level `workspace` mapping: a host there makes every target a workspace."
    import yaml
    spec = yaml.safe_load(laptop.read_text())
    spec["workspace"] = {"host": "https://adb-3333333333333333.3.azuredatabricks.net"}
    laptop.write_text(yaml.safe_dump(spec))
    plain = get_environment("plain", laptop)
    assert not plain.is_local and plain.host == "https://adb-3333333333333333.3.azuredatabricks.net"
    assert get_environment("bundled", laptop).host == "https://adb-1111111111111111.1.azuredatabricks.net"  # its own host wins
    spec["workspace"] = ["not", "a", "mapping"]
    laptop.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="key 'workspace' must be a mapping"): get_environment("plain", laptop)


def test_host_from_the_targets_profile(laptop, metadata_server):
    env = get_environment("profiled", laptop)
    assert env.host == f"{metadata_server}/ws-test" == sdk_host(profile="ws-test")
    assert env.describe() == f"profiled: workspace {metadata_server}/ws-test (host from profile ws-test) (catalog main, schema credit)"
    assert env.workspace.sdk_kwargs == {"profile": "ws-test"}
    assert (env.tracking_uri, env.registry_uri) == ("databricks://ws-test", "databricks-uc://ws-test")


def test_host_from_the_environment(laptop, monkeypatch, metadata_server):
    monkeypatch.setenv("DATABRICKS_HOST", "https://adb-2222222222222222.2.azuredatabricks.net")
    env = get_environment("plain", laptop)
    assert not env.is_local and env.host == "https://adb-2222222222222222.2.azuredatabricks.net"
    assert "(host from DATABRICKS_HOST)" in env.describe() and env.workspace.sdk_kwargs == {}
    assert not get_environment("dev").is_local  # the project's targets too, as the CLI would deploy them there
    monkeypatch.setenv("DATABRICKS_HOST", "")  # empty is unset, for the SDK as for us
    assert get_environment("plain", laptop).is_local
    monkeypatch.setenv("DATABRICKS_CONFIG_PROFILE", "ws-other")
    env = get_environment("plain", laptop)
    assert (env.host, env.workspace.source) == (f"{metadata_server}/ws-other", "profile ws-other")
    assert "(host from profile ws-other)" in env.describe()


@pytest.mark.parametrize("target, env_host, env_profile, source", [
    ("bundled", "https://adb-2222222222222222.2.azuredatabricks.net", "ws-other", "the bundle"),
    ("profiled", "https://adb-2222222222222222.2.azuredatabricks.net", None, "DATABRICKS_HOST"),
    ("profiled", None, "ws-other", "profile ws-test"),
    ("plain", "https://adb-2222222222222222.2.azuredatabricks.net", "ws-other", "DATABRICKS_HOST"),
    ("plain", None, "ws-other", "profile ws-other"),
])
def test_precedence_is_the_sdks(laptop, monkeypatch, target, env_host, env_profile, source):
    "Bundle host, then DATABRICKS_HOST, then a profile's host (the bundle's profile before DATABRICKS_CONFIG_PROFILE): what the SDK makes of the same inputs."
    if env_host: monkeypatch.setenv("DATABRICKS_HOST", env_host)
    if env_profile: monkeypatch.setenv("DATABRICKS_CONFIG_PROFILE", env_profile)
    env = get_environment(target, laptop)
    assert env.workspace.source == source
    assert env.host == sdk_host(**env.workspace.sdk_kwargs)


def test_an_unknown_profile_names_the_key_and_the_file(laptop, monkeypatch):
    laptop.write_text(BUNDLE.replace("profile: ws-test", "profile: ws-missing"))
    with pytest.raises(ConfigError) as e: get_environment("profiled", laptop)
    assert str(e.value).startswith(f"{laptop}: key 'targets.profiled.workspace.profile' names profile 'ws-missing': ")
    assert "has no ws-missing profile configured" in str(e.value) and os.environ["DATABRICKS_CONFIG_FILE"] in str(e.value)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(laptop.parent / "absent"))
    with pytest.raises(ConfigError, match=r"names profile 'ws-missing', but there is no Databricks config file .*absent"):
        get_environment("profiled", laptop)


def test_an_explicit_local_home_keeps_environment_named_targets_local(laptop, monkeypatch, tmp_path):
    "SERVING_MLOPS_HOME (tests, workspace_home in the examples) overrides DATABRICKS_HOST, not what the bundle says."
    monkeypatch.setenv("DATABRICKS_HOST", "https://adb-2222222222222222.2.azuredatabricks.net")
    monkeypatch.setenv("SERVING_MLOPS_HOME", str(tmp_path / "workspaces"))
    assert get_environment("plain", laptop).root == (tmp_path / "workspaces" / "plain").resolve()
    assert get_environment("bundled", laptop).workspace.source == "the bundle"
    assert get_environment("profiled", laptop).workspace.source == "DATABRICKS_HOST"


def test_on_a_databricks_runtime_a_target_without_host_is_a_workspace(laptop, monkeypatch, tmp_path):
    "A job on a cluster is in the cluster's workspace even when the YAML has no host (here the cluster is simulated)."
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no-databrickscfg"))  # a cluster has none
    for target in ("plain", "profiled"):
        env = get_environment(target, laptop)
        assert not env.is_local and env.root is None
        assert env.workspace.source == "the Databricks runtime" and env.workspace.sdk_kwargs == {}  # the runtime authenticates
        assert (env.tracking_uri, env.registry_uri) == ("databricks", "databricks-uc")
    assert "workspace of this cluster (host from the Databricks runtime)" in get_environment("plain", laptop).describe()
    assert not get_environment("dev", ROOT / "databricks_jobs" / "databricks.yml").is_local  # a deployed job never runs in a local workspace
    monkeypatch.setenv("DATABRICKS_HOST", "https://adb-3333333333333333.3.azuredatabricks.net")
    assert get_environment("plain", laptop).host == "https://adb-3333333333333333.3.azuredatabricks.net"
    assert get_environment("bundled", laptop).workspace.sdk_kwargs == {"host": "https://adb-1111111111111111.1.azuredatabricks.net"}
    monkeypatch.setenv("SERVING_MLOPS_HOME", str(tmp_path / "workspaces"))  # the examples' throwaway workspaces
    assert get_environment("plain", laptop).is_local and not get_environment("profiled", laptop).is_local


def test_the_sdk_takes_what_the_environment_gives_it(laptop, metadata_server):
    "The real WorkspaceClient accepts `sdk_kwargs` and authenticates with the profile's own token."
    from databricks.sdk import WorkspaceClient
    params = inspect.signature(WorkspaceClient.__init__).parameters
    assert {"host", "profile"} <= set(params)
    env = get_environment("profiled", laptop)
    w = WorkspaceClient(**env.workspace.sdk_kwargs)
    assert (w.config.host, w.config.token, w.config.auth_type) == (env.host, "dapi-ws-test", "pat")


# --- item 13: Spark against a workspace target off a cluster ------------------------------------------------------------

def run_python(code: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def clean_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update({"TMPDIR": str(tmp_path / "tmp"), "SPARK_LOCAL_IP": "127.0.0.1", "DATABRICKS_CONFIG_FILE": str(tmp_path / "no-databrickscfg"), **extra})
    return env


def test_a_workspace_target_off_a_cluster_is_refused_without_starting_spark(laptop, tmp_path):
    "No Databricks Connect here: get_spark and tables_for refuse with what to do, before any JVM or /tmp warehouse exists."
    proc = run_python(f"""
        import pyspark
        from serving_mlops.config import ConfigError, get_environment
        from serving_mlops.tables import tables_for
        from serving_mlops.spark import get_spark
        env = get_environment("bundled", {str(laptop)!r})
        for call in (lambda: get_spark(env), lambda: tables_for(env)):
            try: call(); print("NO ERROR")
            except ConfigError as e: print("REFUSED", e)
        print("JVM", pyspark.SparkContext._gateway, pyspark.SparkContext._active_spark_context)
    """, clean_env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    refused = [l for l in proc.stdout.splitlines() if l.startswith("REFUSED")]
    assert len(refused) == 2 and "NO ERROR" not in proc.stdout
    assert ("environment 'bundled' is the workspace https://adb-1111111111111111.1.azuredatabricks.net (host from the bundle): "
            "its tables are Unity Catalog tables") in refused[0]
    assert "Run this on a Databricks cluster" in refused[0] and "`serving-mlops jobs run <job> --env bundled`" in refused[0]
    assert "install databricks-connect" in refused[0]
    assert "JVM None None" in proc.stdout
    assert not list((tmp_path / "tmp").rglob("spark-warehouse"))


def test_cli_commands_against_a_workspace_target_off_a_cluster_say_where_they_run(laptop, tmp_path, monkeypatch):
    "`tables` and `generate` (whose landing folder is a Unity Catalog volume) refuse in one line; nothing local is made."
    for k, v in clean_env(tmp_path, SERVING_MLOPS_BUNDLE=str(laptop)).items(): monkeypatch.setenv(k, v)
    proc = cli("tables", "--env", "bundled", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: environment 'bundled' is the workspace https://adb-1111111111111111.1.azuredatabricks.net" in proc.stderr
    assert "Run this on a Databricks cluster" in proc.stderr
    assert not list((tmp_path / "tmp").rglob("spark-warehouse"))
    proc = cli("generate", "--env", "bundled", "--rows", "10", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "its landing folder /Volumes/main/credit/landing is a Unity Catalog volume, mounted only on Databricks clusters" in proc.stderr
    assert "`databricks fs cp FILE dbfs:/Volumes/main/credit/landing/`" in proc.stderr


DATABRICKS_CONNECT_STAND_IN = """
import sys, types
calls = []
class Builder:
    def host(self, host): calls.append(("host", host)); return self
    def profile(self, profile): calls.append(("profile", profile)); return self
    def getOrCreate(self): calls.append(("getOrCreate",)); return "a Databricks Connect session"
class DatabricksSession:
    builder = Builder()
connect = types.ModuleType("databricks.connect"); connect.DatabricksSession = DatabricksSession
sys.modules["databricks.connect"] = connect
"""


def test_with_databricks_connect_a_workspace_target_gets_a_session_on_its_workspace(laptop, tmp_path, metadata_server):
    "The builder is given the host from the bundle, or the profile (databricks-connect stands in: see the module docstring)."
    proc = run_python(DATABRICKS_CONNECT_STAND_IN + f"""
from serving_mlops.config import get_environment
from serving_mlops.tables import SparkTables, tables_for
from serving_mlops.spark import get_spark
for target in ("bundled", "profiled"):
    calls.clear()
    print(target, get_spark(get_environment(target, {str(laptop)!r})), calls)
t = tables_for(get_environment("bundled", {str(laptop)!r}))
print("tables", type(t).__name__, t.spark)
""", clean_env(tmp_path, DATABRICKS_CONFIG_FILE=os.environ["DATABRICKS_CONFIG_FILE"]), tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "bundled a Databricks Connect session [('host', 'https://adb-1111111111111111.1.azuredatabricks.net'), ('getOrCreate',)]"
    assert lines[1] == "profiled a Databricks Connect session [('profile', 'ws-test'), ('getOrCreate',)]"
    assert lines[2] == "tables SparkTables a Databricks Connect session"


# --- item 15: the examples on a cluster ------------------------------------------------------------------------------------

CLUSTER_EXAMPLE = """
import os, tempfile
import pandas as pd
from pyspark.sql import SparkSession
from serving_mlops.config import ConfigError, get_environment, workspace_home
from serving_mlops.tables import tables_for
from serving_mlops.spark import get_spark
jvm = os.environ.get("SERVING_MLOPS_SPARK_JAVA_OPTIONS", "")  # make test's short-JVM flags and class archive, as get_spark applies them
spark = SparkSession.builder.master({master!r}).config("spark.driver.host", "127.0.0.1").config("spark.ui.enabled", "false") \\
    .config("spark.executor.memory", "512m").config("spark.driver.extraJavaOptions", jvm) \\
    .config("spark.executor.extraJavaOptions", jvm).getOrCreate()
os.environ["DATABRICKS_RUNTIME_VERSION"] = "17.3"  # from here on, this process is a (simulated) Databricks cluster
with workspace_home(tempfile.mkdtemp()): env = get_environment("dev")
print("LOCAL", env.is_local)
try:
    same = get_spark(env) is spark and get_spark() is spark
    tables = tables_for(env)
    tables.overwrite("dev.credit.example", pd.DataFrame({{"customer_id": [1, 2, 3]}}))
    print("SESSION", same, tables.read_spark("dev.credit.example", spark=get_spark()).count())
except ConfigError as e: print("REFUSED", e)
"""


@pytest.mark.slow
def test_the_examples_on_a_single_node_cluster_use_its_session(tmp_path):
    proc = run_python(CLUSTER_EXAMPLE.format(master="local[1]"), clean_env(tmp_path), ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "LOCAL True" in proc.stdout and "SESSION True 3" in proc.stdout


@pytest.mark.slow
def test_the_examples_on_a_multi_node_cluster_are_refused_with_the_reason(tmp_path):
    "local-cluster runs executors in their own JVMs and reports a non-local master, as a multi-node cluster does."
    proc = run_python(CLUSTER_EXAMPLE.format(master="local-cluster[1,1,1024]"), clean_env(tmp_path), ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "LOCAL True" in proc.stdout
    assert "REFUSED environment 'dev' is a local workspace in" in proc.stdout
    assert "(spark.master is 'local-cluster[1,1,1024]'). The examples run on a single-node cluster" in proc.stdout


def test_a_local_job_run_from_a_notebook_on_a_cluster_keeps_its_parameters_and_task_values(monkeypatch, tmp_path):
    "The examples' local job runs start papermill kernels on the driver: Databricks is there, the notebook's dbutils is not."
    from serving_mlops.config import TASK_VALUES_ENV_VAR, set_task_value, task_parameters
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    assert task_parameters(env_name="staging", rows=10) == {"env_name": "staging", "rows": 10}
    monkeypatch.setenv(TASK_VALUES_ENV_VAR, str(tmp_path / "values.json"))
    set_task_value("model_version", "7")
    assert (tmp_path / "values.json").read_text() == '{"model_version": "7"}'


# --- make and the tests ignore a workspace named by the shell ---------------------------------------------------------------

def test_the_tests_run_without_a_workspace_from_the_shell():
    "conftest removes them, so a developer's DATABRICKS_HOST cannot turn the tests' targets into workspaces."
    assert not any(os.environ.get(v) for v in ("DATABRICKS_HOST", "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_RUNTIME_VERSION"))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("goal", ["demo", "test"])
def test_make_demo_and_test_ignore_a_workspace_named_by_the_shell(goal, tmp_path):
    "The recipes of `make demo` and `make test` see DATABRICKS_HOST and DATABRICKS_CONFIG_PROFILE empty (their other prerequisites are skipped)."
    env = {**os.environ, "DATABRICKS_HOST": "https://adb-2222222222222222.2.azuredatabricks.net", "DATABRICKS_CONFIG_PROFILE": "ws"}
    skip = [a for p in (".venv/.installed", ".venv/.installed-dev", ".venv/node/.installed", "java", "chromium", "replay-env",
                        ".venv/spark-classes.jsa") for a in ("-o", p)]
    show = "env-check: ; @echo \"host=[$$DATABRICKS_HOST] profile=[$$DATABRICKS_CONFIG_PROFILE]\"; exit 3"
    proc = subprocess.run(["make", "--no-print-directory", *skip, f"--eval={goal}: env-check", f"--eval={show}", goal],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "host=[] profile=[]" in proc.stdout, proc.stdout + proc.stderr


# --- issue 26 item 1: a job task finds the bundle as the CLI deployed it --------------------------------------------------

def test_a_task_on_a_cluster_finds_the_bundle_folder_the_cli_synced(tmp_path, monkeypatch):
    "`databricks bundle deploy` syncs the bundle folder itself to <file_path> (the sync root is the folder of databricks.yml); a task's notebook runs in <file_path>/notebooks (DBR 14+)."
    from serving_mlops.config import find_bundle
    files = tmp_path / "Workspace/Users/someone/.bundle/serving-mlops/staging/files"
    shutil.copytree(ROOT / "databricks_jobs", files)
    for var in ENV_VARS: monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "18.0")
    monkeypatch.chdir(files / "notebooks")
    assert find_bundle() == files / "databricks.yml"  # not the checkout beside this editable install: a cluster has none
    assert get_environment("staging").var("catalog") == "staging"
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION")  # off a cluster a databricks.yml of another folder is not taken for the project's
    assert find_bundle() == ROOT / "databricks_jobs" / "databricks.yml"


def test_bundle_var_environment_variables_set_variables_as_for_the_cli(laptop, monkeypatch):
    "BUNDLE_VAR_<name> wins over the target's value and the default (the CLI's bundle/config/mutator/set_variables.go); references follow."
    monkeypatch.setenv("BUNDLE_VAR_catalog", "sandbox")
    env = get_environment("staging")
    assert (env.var("catalog"), env.var("model_name"), env.var("ingest_max_bad_fraction", float)) == ("sandbox", "sandbox.credit.default_model", 0.02)
    assert get_environment("plain", laptop).var("catalog") == "sandbox"


# --- issue 26 item 6: promotion from another workspace --------------------------------------------------------------------

class SecretsStandIn:
    "Stands in for a Databricks runtime's `dbutils` (cannot exist here): `secrets.get(scope, key)` from a dict."
    def __init__(self, secrets): self.secrets = type("Secrets", (), {"get": lambda _, scope, key: secrets[(scope, key)]})()


def test_a_promotion_from_another_workspace_reads_the_source_registry_through_a_secret_scope(tmp_path, monkeypatch):
    "On prod's cluster every target without a host is prod's workspace; `promote_source_registry` points the source's registry at staging's workspace, with credentials MLflow reads from a secret scope."
    from mlflow.utils import databricks_utils
    from serving_mlops.registry import promotion_source, verified_on
    for var in ENV_VARS: monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "18.0")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no-databrickscfg"))
    bundle = ROOT / "databricks_jobs" / "databricks.yml"
    same = promotion_source(get_environment("prod", bundle), "staging")  # by default: staging's catalog in this workspace
    assert (same.registry, same.registry_uri, same.catalog) == (None, "databricks-uc", "staging")
    assert verified_on(same, get_environment("prod", bundle)) is same  # on the source's held-out data, as before
    monkeypatch.setenv("BUNDLE_VAR_promote_source_registry", "databricks-uc://mlops:staging")  # as deployed for prod:
    monkeypatch.setenv("BUNDLE_VAR_catalog", "prod"); monkeypatch.setenv("SERVING_MLOPS_BUNDLE_TARGET", "prod")  # prod's values
    prod = get_environment("prod", bundle)
    source = promotion_source(prod, "staging")
    assert (source.registry_uri, source.tracking_uri, source.var("model_name")) == ("databricks-uc://mlops:staging", "databricks",
                                                                                    "staging.credit.default_model")
    assert verified_on(source, prod) is prod  # prod's own tables: the cluster cannot read another workspace's
    # what MLflow does with the URI on a cluster (its dbutils stood in): the source workspace and token from the scope
    monkeypatch.setattr(databricks_utils, "_get_dbutils", lambda: SecretsStandIn(
        {("mlops", "staging-host"): "https://adb-2222222222222222.2.azuredatabricks.net", ("mlops", "staging-token"): "dapi-staging"}))
    config = databricks_utils.TrackingURIConfigProvider(source.registry_uri).get_config()
    assert (config.host, config.token) == ("https://adb-2222222222222222.2.azuredatabricks.net", "dapi-staging")
    for wrong in ("databricks://mlops:staging", "databricks-uc://mlops", "staging"):
        monkeypatch.setenv("BUNDLE_VAR_promote_source_registry", wrong)
        with pytest.raises(ConfigError, match=r"promote_source_registry' of target 'prod' is .*expected databricks-uc://<secret scope>:<key prefix>"):
            promotion_source(get_environment("prod", bundle), "staging")


def test_a_model_of_another_workspace_is_read_through_mlflows_unity_catalog_repository(tmp_path, monkeypatch):
    """MLflow refuses to read a Unity Catalog model's files through databricks-uc://<scope>:<prefix> (its registry client takes
    the URI, its artifact repository does not): a promotion from another workspace stopped at the download. Within
    `using_mlflow(source)` MLflow reads them, as the promotion's copy and check do, from the source workspace with its
    token. Staging's workspace is the replay's loopback stand-in (replay_workspace); the secret scope a `dbutils` stand-in."""
    import mlflow
    import numpy as np
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.utils import databricks_utils
    from sklearn.linear_model import LogisticRegression
    from serving_mlops.config import using_mlflow
    from serving_mlops.registry import promotion_source
    from serving_mlops.replay_workspace import serve_registry
    X = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1]])
    model = LogisticRegression().fit(X, [0, 1, 0, 1])
    staging = f"sqlite:///{tmp_path / 'staging.db'}"  # staging's registry, with its model as version 1
    with using_tracking(staging):
        experiment = mlflow.create_experiment("train", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            logged = mlflow.sklearn.log_model(model, name="model", input_example=X[:1])
        mlflow.register_model(logged.model_uri, "staging.credit.default_model")
    for var in ENV_VARS: monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "18.0")
    monkeypatch.setenv("BUNDLE_VAR_promote_source_registry", "databricks-uc://mlops:staging")
    monkeypatch.setenv("BUNDLE_VAR_catalog", "prod"); monkeypatch.setenv("SERVING_MLOPS_BUNDLE_TARGET", "prod")
    server = serve_registry(staging, "dapi-staging", tmp_path / "served")
    monkeypatch.setattr(databricks_utils, "_get_dbutils", lambda: SecretsStandIn(
        {("mlops", "staging-host"): server.url, ("mlops", "staging-token"): "dapi-staging"}))
    source = promotion_source(get_environment("prod", ROOT / "databricks_jobs" / "databricks.yml"), "staging")
    uri = f"models:/{source.model_name}/1"
    # off the cluster from here: on one, MLflow's Unity Catalog repository would also start Spark to resolve model names
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION")
    with pytest.raises(MlflowException, match="Remote model registry access .* unsupported for models in the Unity Catalog"):
        ModelsArtifactRepository(uri, registry_uri=source.registry_uri)  # what the copy's download did before
    try:
        with using_mlflow(source):
            registry = mlflow.get_registry_uri()
            local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "copy"))  # copy_model_version's read
            loaded = mlflow.pyfunc.load_model(uri)  # verify_copy's
            written = Path(os.environ["DATABRICKS_CONFIG_FILE"])
            assert oct(written.parent.stat().st_mode & 0o777) == "0o700"
    finally: server.shutdown()
    assert registry == "databricks-uc://mlops-staging"
    served = next((tmp_path / "served").rglob("MLmodel")).parent  # the version's files as staging's registry holds them
    assert {p.name for p in served.iterdir()} <= {p.name for p in Path(local).iterdir()}  # MLflow adds registered_model_meta
    assert all((Path(local) / p.name).read_bytes() == p.read_bytes() for p in served.iterdir() if p.is_file())
    assert list(loaded.predict(X)) == list(model.predict(X))
    asked = {(c["method"], c["path"].split("/Models")[0]) for c in server.calls if not c["path"].startswith("/.well-known")}
    assert asked == {("POST", "/api/2.0/mlflow/unity-catalog/model-versions/generate-temporary-credentials"),
                     ("GET", "/api/2.0/fs/directories"), ("POST", "/api/2.0/fs/create-download-url"), ("GET", "/presigned")}
    assert {c["status"] for c in server.calls} == {200}  # every call carried staging's token (401 otherwise)
    assert not written.exists() and "DATABRICKS_CONFIG_FILE" not in os.environ  # the token's file lasted as long as the block
    assert "MLFLOW_USE_DATABRICKS_SDK_MODEL_ARTIFACTS_REPO_FOR_UC" not in os.environ


@contextlib.contextmanager
def using_tracking(uri):
    "MLflow's tracking and registry URIs are `uri` within the block."
    import mlflow
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    try: yield
    finally: mlflow.set_tracking_uri(before[0]); mlflow.set_registry_uri(before[1])
