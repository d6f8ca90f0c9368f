"""Which workspace a target is (issue 13, item 3): the host from the bundle, a profile, DATABRICKS_HOST or the Databricks
runtime, as the Databricks CLI and SDK find it; and that `make` and the tests stay in local workspaces whatever the shell says.

No Databricks workspace or cluster exists on this machine. What stands in, and why:
- a loopback HTTP server answers `GET /.well-known/databricks-config` (404) for the hosts of test profiles: databricks-sdk's
  `Config` probes it when it resolves a profile (out of reach it would retry for a second);
- a cluster is simulated by `DATABRICKS_RUNTIME_VERSION`, the variable Databricks runtimes set and serving_mlops reads;
  the runtime's own workspace URL (which the SDK reads from the notebook or job context) is not there to read.
"""
import http.server
import inspect
import os
import shutil
import subprocess
import threading

import pytest
from conftest import ROOT

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
    assert not get_environment("dev").is_local  # the project's targets: a deployed job never runs in a local workspace
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


# --- make and the tests ignore a workspace named by the shell ---------------------------------------------------------------

def test_the_tests_run_without_a_workspace_from_the_shell():
    "conftest removes them, so a developer's DATABRICKS_HOST cannot turn the tests' targets into workspaces."
    assert not any(os.environ.get(v) for v in ("DATABRICKS_HOST", "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_RUNTIME_VERSION"))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("goal", ["demo", "test"])
def test_make_demo_and_test_ignore_a_workspace_named_by_the_shell(goal, tmp_path):
    "The recipes of `make demo` and `make test` see DATABRICKS_HOST and DATABRICKS_CONFIG_PROFILE empty (their other prerequisites are skipped)."
    env = {**os.environ, "DATABRICKS_HOST": "https://adb-2222222222222222.2.azuredatabricks.net", "DATABRICKS_CONFIG_PROFILE": "ws"}
    skip = [a for p in (".venv/.installed", ".venv/.installed-dev", ".venv/node/.installed", "java") for a in ("-o", p)]
    show = "env-check: ; @echo \"host=[$$DATABRICKS_HOST] profile=[$$DATABRICKS_CONFIG_PROFILE]\"; exit 3"
    proc = subprocess.run(["make", "--no-print-directory", *skip, f"--eval={goal}: env-check", f"--eval={show}", goal],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "host=[] profile=[]" in proc.stdout, proc.stdout + proc.stderr
