"""Shared fixtures: every test works in throwaway local workspaces, never in the project's .mlops/."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
