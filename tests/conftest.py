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


@pytest.fixture
def home(tmp_path, monkeypatch):
    "A SERVING_MLOPS_HOME of its own for the test (and the processes it starts)."
    monkeypatch.setenv("SERVING_MLOPS_HOME", str(tmp_path / "workspaces"))
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    monkeypatch.chdir(ROOT)
    return tmp_path / "workspaces"


def cli(*args, check=True):
    "Run the installed `serving-mlops` console script; returns the completed process."
    exe = BIN / "serving-mlops"
    if not exe.exists(): exe = shutil.which("serving-mlops")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"serving-mlops {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


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
