"""Shared fixtures: every test works in throwaway local workspaces, never in the project's .mlops/."""
import json
import os
import shutil
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Tests work in local workspaces whatever the developer's shell says: like the Databricks CLI, serving_mlops takes a
# workspace named by DATABRICKS_HOST or DATABRICKS_CONFIG_PROFILE (or a Databricks runtime) for every target without a host.
for _var in ("DATABRICKS_HOST", "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_RUNTIME_VERSION"): os.environ.pop(_var, None)


def expensive(fixture_function):
    "Mark a fixture that builds an expensive world (a trained model, a runtime process, job runs): every test that uses it is `slow`."
    fixture_function.expensive = True
    return fixture_function


@pytest.fixture(scope="session")
@expensive
def trained_world(tmp_path_factory):
    "The served workspace's trained world, built once per session for every module that serves it (once per pytest-xdist worker that runs one)."
    from served import TrainedWorld
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARK_LOCAL_IP", "127.0.0.1"); mp.chdir(ROOT)
        return TrainedWorld(tmp_path_factory.mktemp("trained") / "workspaces")


@pytest.fixture(scope="module")
@expensive
def ws(trained_world):
    "A serving runtime of the trained world for the module (one process; a module may define its own `ws` with other options)."
    from served import ServedWorkspace
    served = ServedWorkspace(trained_world)
    yield served
    served.close()


def pytest_itemcollected(item):
    "A test that uses an `expensive` fixture is `slow`: `make check` leaves it out."
    fixtures = [d for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
    if any(getattr(d.func, "expensive", False) for d in fixtures): item.add_marker(pytest.mark.slow)


# --- the longest modules first --------------------------------------------------------------------------------------------
# `make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`: each module whole on one worker, in the order of
# the collection. Ordered longest first (their time on the last whole passing run, kept in pytest's cache; in a fresh clone,
# without a cache, the times in tests/module_seconds.json, a passing run's copied by hand; a module timed in neither first,
# by its number of slow tests), the two workers end together instead of one running a long module alone (a fresh clone's
# replay, ordered by its few tests, started late and ran alone at the end).
MODULE_SECONDS = Path(__file__).with_name("module_seconds.json")

def module_of(nodeid: str) -> str: return nodeid.split("::")[0]

def _seconds_key(module: str) -> str: return "serving_mlops/module_seconds/" + module.replace("/", "_")


def pytest_collection_modifyitems(config, items):
    modules = list(dict.fromkeys(module_of(i.nodeid) for i in items))
    slow = {m: sum(1 for i in items if module_of(i.nodeid) == m and i.get_closest_marker("slow")) for m in modules}
    cache = getattr(config, "cache", None)  # none with -p no:cacheprovider
    known = json.loads(MODULE_SECONDS.read_text()) if MODULE_SECONDS.exists() else {}
    seconds = {m: (cache.get(_seconds_key(m), None) if cache else None) or known.get(m) for m in modules}
    rank = {m: (1, -seconds[m]) if isinstance(seconds[m], (int, float)) else (0, -slow[m]) for m in modules}
    items.sort(key=lambda i: rank[module_of(i.nodeid)])  # stable: a module's tests keep their order


_spent: dict = {}


def pytest_runtest_logreport(report):
    _spent[module_of(report.nodeid)] = _spent.get(module_of(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    "Remember each module's time, from the controller (or a run without workers), after a passing run of whole modules."
    config = session.config
    if hasattr(config, "workerinput") or exitstatus != 0 or config.option.markexpr or config.option.keyword: return
    if getattr(config, "cache", None) is None: return
    for module, spent in _spent.items(): config.cache.set(_seconds_key(module), round(spent, 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs an expensive world, a process or a Spark job (over a few seconds); `make check` skips it")
    config.addinivalue_line("markers", "soak: runs in `make test` at a smaller volume and in the soak tier (`make soak`, CI runs it) at full volume")


# --- the soak tier ---------------------------------------------------------------------------------------------------------
# The fuzzes prove two things: that no shape of body breaks the runtime (every shape is drawn hundreds of times at make
# test's volume) and that volume does not (issue 28's 10,000 bodies, then monitoring over the same window). The second is
# the soak tier's: `make soak` reruns the `soak` tests with --soak after `make test` in CI, which issue 25 allows a test
# that cannot fit the suite's budget (the invocations' fuzz alone was about 95 s of a 600 s suite on the 2-core machine).
def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", help="the soak tier: `soak` tests at full volume (make soak)")


@pytest.fixture(scope="session")
def soak(request) -> bool:
    "Whether this run is the soak tier (`--soak`): a `soak` test takes its full volume, else make test's."
    return request.config.getoption("--soak")


@pytest.fixture
def home(tmp_path, monkeypatch):
    "A SERVING_MLOPS_HOME of its own for the test (and the processes it starts)."
    monkeypatch.setenv("SERVING_MLOPS_HOME", str(tmp_path / "workspaces"))
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    monkeypatch.chdir(ROOT)
    return tmp_path / "workspaces"


def cli(*args, check=True, process=False):
    """Run `serving-mlops *args`; returns a CompletedProcess (returncode, stdout, stderr); with `check`, a non-zero exit fails.

    In process by default (typer's CliRunner: the command's own code, parsing and error messages, without a new Python and
    JVM each time); `process=True` runs the installed console script as a separate process, for what only a process shows
    (the entry point, exit statuses as a shell sees them). An exception the CLI lets through is printed as the process would."""
    proc = cli_process(*args) if process else cli_in_process(*args)
    if check and proc.returncode != 0:
        raise AssertionError(f"serving-mlops {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_in_process(*args) -> subprocess.CompletedProcess:
    "The command run by typer's CliRunner in this process, as the process would end (an escaping exception's traceback on stderr)."
    import traceback
    from typer.testing import CliRunner
    from serving_mlops.cli import app
    result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["serving-mlops", *args], result.exit_code, result.stdout, stderr)


def cli_process(*args) -> subprocess.CompletedProcess:
    "The installed `serving-mlops` console script run as a separate process."
    exe = BIN / "serving-mlops"
    if not exe.exists(): exe = shutil.which("serving-mlops")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=600)


class RestStandIn(BaseHTTPRequestHandler):
    "Base of the loopback stand-ins of a workspace's REST API: JSON answers, the SDK's discovery probe; subclasses route the rest."
    def log_message(self, *args): pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self): self.route("GET")
    def do_POST(self): self.route("POST")

    def parsed(self):
        "The request's URL, query parameters and JSON body."
        url = urlparse(self.path)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        return url, {k: v[0] for k, v in parse_qs(url.query).items()}, body

    def route(self, method): raise NotImplementedError
