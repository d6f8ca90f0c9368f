"""The job task notebooks and the local job runner: papermill runs them with parameters, as a job runner does."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nbformat
import papermill as pm
import pytest
from conftest import BIN, ROOT, cli

from serving_mlops.config import get_environment
from serving_mlops.data import write_credit_data
from serving_mlops.tables import tables_for

NOTEBOOK = ROOT / "databricks_jobs" / "notebooks" / "ingest.ipynb"


TASK_NOTEBOOKS = sorted((ROOT / "databricks_jobs" / "notebooks").glob("*.ipynb"))
CALLER_ONLY = {"env", "register", "alert"}  # parameters of a task function that only the CLI passes


@pytest.mark.parametrize("path", TASK_NOTEBOOKS, ids=lambda p: p.stem)
def test_task_notebooks_are_thin_and_take_their_task_functions_parameters(path):
    "A title, the `parameters` cell, one call of run_task with a serving_mlops.tasks function; nothing else."
    import inspect
    import serving_mlops.tasks as tasks
    cells = json.loads(path.read_text())["cells"]
    assert [c["cell_type"] for c in cells] == ["markdown", "code", "code"], path.name
    assert "".join(cells[0]["source"]).startswith("# ") and cells[1]["metadata"].get("tags") == ["parameters"]
    call = "".join(cells[2]["source"])
    imports = [l for l in call.splitlines() if "import" in l]
    assert len(imports) == 1 and imports[0].startswith("from serving_mlops.tasks import "), call  # no fastcore, nbdev, example data
    task = next(getattr(tasks, n) for n in imports[0].split(" import ")[1].split(", ") if n != "run_task")
    defaults = {name: p["default"] for name, p in pm.inspect_notebook(str(path)).items()}
    takes = [n for n in inspect.signature(task).parameters if n not in CALLER_ONLY]
    assert sorted(defaults) == sorted(["env_name", *takes]), (path.name, sorted(defaults), takes)
    assert all(f"{n}={n}" in call for n in takes), call  # every parameter reaches the task


def test_every_job_task_runs_a_task_notebook(home):
    from serving_mlops.jobs import load_jobs
    for env in ("dev", "staging", "prod"):
        for job in load_jobs(get_environment(env)).values():
            for t in job.tasks.values():
                assert t.notebook in TASK_NOTEBOOKS, (job.name, t.key, t.notebook)
                assert set(t.parameters) <= set(pm.inspect_notebook(str(t.notebook))), (job.name, t.key, t.parameters)


@pytest.mark.slow
def test_papermill_runs_ingest_in_staging(home, tmp_path):
    staging = get_environment("staging")
    write_credit_data(Path(staging.landing_dir) / "clients.csv", 1500, seed=3, progress=False)
    out = tmp_path / "ingest.out.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out), parameters={"env_name": "staging", "snapshot_date": "2005-10-01"},
                        cwd=str(NOTEBOOK.parent), kernel_name="python3", progress_bar=False)
    tables = tables_for(staging)
    assert tables.count("staging.credit.silver_clients") == 1500
    assert tables.count("staging.credit.silver_statements") == 9000
    assert tables_for(get_environment("dev")).list() == []  # the job touched staging only
    printed = "".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []))
    assert "1500 rows, 1500 accepted, 0 quarantined" in printed
    executed = nbformat.read(out, as_version=4).cells  # only the task's work: title, parameters, papermill's injected ones, the call
    assert len(executed) == 4, [c.source for c in executed]
    assert executed[-1].outputs[-1]["data"]["text/plain"] == "{'files': 1, 'rows': 1500, 'quarantined': 0}"  # its task values


def test_spark_reads_what_ingest_wrote(home):
    from serving_mlops.ingest import ingest_landing
    from serving_mlops.spark import get_spark
    env = get_environment("dev")
    write_credit_data(Path(env.landing_dir) / "clients.parquet", 2000, seed=8, progress=False)
    ingest_landing(env, progress=False)
    tables = tables_for(env)
    spark = get_spark(env)
    silver = tables.read_spark("dev.credit.silver_clients", spark=spark)
    assert silver.count() == 2000
    assert dict(silver.dtypes)["customer_id"] == "bigint" and dict(silver.dtypes)["snapshot_date"] == "date"
    joined = tables.read_spark("dev.credit.silver_statements", spark=spark).join(silver, ["customer_id", "snapshot_date"])
    assert joined.count() == 12000


NOISE = ("IPKernelApp", "NativeCodeLoader", "Setting default log level")  # the kernel's and Spark's, not the task's


@pytest.mark.slow
def test_a_failed_task_fails_the_run_naming_task_and_cell_and_skips_its_dependents(home):
    staging = get_environment("staging")
    write_credit_data(Path(staging.landing_dir) / "clients.csv", 400, seed=3, progress=False, bad_fraction=0.3)
    r = cli("jobs", "run", "model_build", "--env", "staging", check=False)
    assert r.returncode == 1
    assert "job model_build failed in task 'ingest': cell" in r.stderr and "of ingest.ipynb raised IngestError" in r.stderr
    (run_dir,) = (staging.root / "jobs" / "model_build").iterdir()
    run = json.loads((run_dir / "run.json").read_text())
    assert [(t["key"], t["state"]) for t in run["tasks"]] == [("ingest", "FAILED"), ("features", "SKIPPED"), ("train", "SKIPPED"), ("validate", "SKIPPED")]
    assert [t["depends_on"] for t in run["tasks"]] == [[], ["ingest"], ["features"], ["train"]]  # the run's graph, as it ran
    assert (run_dir / "ingest.ipynb").exists()  # the executed notebook, with the error in its outputs
    r = cli("jobs", "repair", "model_build", run_dir.name + "x", "--env", "staging", check=False)  # a run that is not there
    assert r.returncode != 0 and f"no run {run_dir.name}x of job model_build recorded in" in r.stderr, r.stderr
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]  # and it left no folder behind


@pytest.mark.slow
def test_ctrl_c_cancels_a_local_job_run_and_records_it(home):
    staging = get_environment("staging")
    write_credit_data(Path(staging.landing_dir) / "clients.csv", 500, seed=3, progress=False)
    proc = subprocess.Popen([str(BIN / "serving-mlops"), "jobs", "run", "ingest", "--env", "staging"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    assert "[ingest/ingest]" in proc.stdout.readline()  # the task has started
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "its run is recorded as CANCELED" in err, err
    (run_dir,) = (staging.root / "jobs" / "ingest").iterdir()
    assert [t["state"] for t in json.loads((run_dir / "run.json").read_text())["tasks"]] == ["CANCELED"]

@pytest.mark.slow
def test_ingest_then_features_with_local_jobs(home):
    """The local job runner as `make demo` uses it, on the staging ingest and features jobs: each task's own lines on the
    terminal, the kernel's and Spark's in its log, the executed notebooks, run.json. The loop's jobs (model_build, deploy,
    promote, batch inference, monitoring) run in tests/test_replay.py from the same task notebooks, as a job cluster runs
    them on the runtime's libraries, and through this runner in `make demo`."""
    staging = get_environment("staging")
    write_credit_data(Path(staging.landing_dir) / "clients.csv", 3000, seed=3, progress=False)
    assert "ingest: SUCCESS" in cli("jobs", "run", "ingest", "--env", "staging").stdout
    r = cli("jobs", "run", "features", "--env", "staging", process=True)  # as a shell runs it
    out = r.stdout
    assert "job features in staging" in out and "features: SUCCESS" in out
    assert not [l for l in (out + r.stderr).splitlines() if any(n in l for n in NOISE)], out + r.stderr
    lines = out.splitlines()
    features = lines[lines.index(next(l for l in lines if l.startswith("[features/features] features.ipynb {'env_name': 'staging'"))) + 1:]
    own = features[:features.index(next(l for l in features if l.startswith("[features/features] SUCCESS in ")))]
    assert own[0].split(None, 1)[1] == f"building feature tables in staging: local workspace {staging.root} (catalog staging, schema credit)"
    assert any(l.endswith("  staging.credit.behaviour_features: 3,000 rows, 13 features, keys ['customer_id'] + snapshot_date; "
                          "online: 3,000 keys") for l in own), own
    assert all(l.startswith("   ") and l[:7].strip().replace(":", "").isdigit() for l in own), own
    (run_dir,) = (staging.root / "jobs" / "features").iterdir()
    log = (run_dir / "features.log").read_text()
    assert all(n in log for n in NOISE) and "staging.credit.behaviour_features: 3,000 rows" in log, log  # where they went
    assert "NativeCodeLoader" not in (run_dir / "features.ipynb").read_text()  # nor in the executed notebook
    assert f"logs (kernel, Spark and library output): {run_dir}/<task>.log" in out and "(log: " not in out  # the runs succeeded
    run = json.loads((run_dir / "run.json").read_text())
    assert run["state"] == "SUCCESS" and run["started"].startswith("20") and run["tasks"][0]["log"] == str(run_dir / "features.log")
    assert sorted(p.name for p in run_dir.glob("*.ipynb")) == ["features.ipynb"]


# --- Jobs on a real workspace target -------------------------------------------------------------
# A Databricks workspace cannot exist on this machine. JobsApiStandIn stands in for one: a real HTTP
# server on 127.0.0.1 that answers the routes databricks-sdk calls (`/.well-known/databricks-config`,
# `scim/v2/Me`, jobs `runs/submit`, `runs/get`, `runs/get-output`, `runs/cancel`), records every request, and reports
# the submitted tasks as finished (or one of them failed, or all still running). A finished task's
# `runs/get-output` has the `notebook_output.result` its notebook would end with on Databricks
# (`dbutils.notebook.exit` of its task values, in `run_task`): NOTEBOOK_RESULTS, as the task functions
# return them. The assertions are on what the real SDK sent over HTTP and on how serving_mlops reads
# the SDK's parsed answers; what runs on the clusters is not exercised here.

import shutil
import threading
from http.server import ThreadingHTTPServer

from conftest import RestStandIn

USER = "ml-ops@example.com"
WHEEL = "serving_mlops-0.0.1-py3-none-any.whl"
NOTEBOOK_RESULTS = {"ingest": {"files": 1, "rows": 400, "quarantined": 0},
                    "features": {"tables": ["staging.credit.behaviour_features", "staging.credit.demographic_features"]},
                    "train": {"run_id": "6f1e", "model_uri": "runs:/6f1e/model"}, "validate": {"model_version": "3"}}


class JobsApiStandIn(RestStandIn):
    "The part of a workspace's REST API that `jobs run` uses; `outcome` is 'success', 'fail:<task>' or 'hang'."
    def route(self, method):
        ws, (url, query, body) = self.server, self.parsed()
        ws.requests.append((method, url.path, query, body, self.headers.get("Authorization")))
        if url.path == "/.well-known/databricks-config": return self.answer(200, {"workspace_id": "1234"})  # the SDK's discovery probe
        if url.path == "/api/2.0/preview/scim/v2/Me": return self.answer(200, {"userName": USER, "id": "7"})
        if (method, url.path) == ("POST", "/api/2.2/jobs/runs/submit"):
            ws.submitted = body
            return self.answer(200, {"run_id": 42})
        if (method, url.path) == ("GET", "/api/2.2/jobs/runs/get") and query.get("run_id") == "42": return self.answer(200, ws.run())
        if (method, url.path) == ("GET", "/api/2.2/jobs/runs/get-output"):
            task = next(t for t in ws.run()["tasks"] if str(t["run_id"]) == query["run_id"])
            if task["state"].get("result_state") == "FAILED":
                return self.answer(200, {"error": "IngestError: 120 of 400 rows quarantined (30.0%), more than 2.0%"})
            result = NOTEBOOK_RESULTS.get(task["task_key"])
            return self.answer(200, {"notebook_output": {"result": json.dumps(result), "truncated": False}} if result else {})
        if (method, url.path) == ("POST", "/api/2.2/jobs/runs/cancel"): return self.answer(200, {})
        self.answer(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"No API found for '{method} {url.path}'"})


class StandInWorkspace(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), JobsApiStandIn)
        self.requests, self.submitted, self.outcome = [], None, "success"
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def run(self):
        "runs/get for the submitted run: each task's state follows `outcome` (downstream of a failure: UPSTREAM_FAILED)."
        page = f"{self.url}/?o=1#job/1/run/42"
        failed, tasks = self.outcome[5:] if self.outcome.startswith("fail:") else None, []
        for i, t in enumerate(self.submitted["tasks"]):
            upstream = [d["task_key"] for d in t.get("depends_on", [])]
            if self.outcome == "hang": state = {"life_cycle_state": "RUNNING", "state_message": "In run"}
            elif t["task_key"] == failed: state = {"life_cycle_state": "TERMINATED", "result_state": "FAILED", "state_message": "Workload failed, see run output for details"}
            elif failed and any(s["result_state"] != "SUCCESS" for s in (x["state"] for x in tasks if x["task_key"] in upstream)):
                state = {"life_cycle_state": "TERMINATED", "result_state": "UPSTREAM_FAILED", "state_message": "Upstream task(s) failed."}
            else: state = {"life_cycle_state": "TERMINATED", "result_state": "SUCCESS", "state_message": ""}
            tasks.append({"task_key": t["task_key"], "run_id": 100 + i, "state": state, "notebook_task": t["notebook_task"],
                          **({"depends_on": t["depends_on"]} if "depends_on" in t else {}),  # RunTask.depends_on, as submitted
                          "start_time": 1_700_000_000_000, "end_time": 1_700_000_090_000, "run_page_url": f"{page}/task/{100 + i}"})
        over = all(t["state"]["life_cycle_state"] == "TERMINATED" for t in tasks)
        result = {"result_state": "SUCCESS" if all(t["state"].get("result_state") == "SUCCESS" for t in tasks) else "FAILED"} if over else {}
        return {"run_id": 42, "run_name": self.submitted["run_name"], "run_page_url": page, "tasks": tasks,
                "state": {"life_cycle_state": "TERMINATED" if over else "RUNNING", **result, "state_message": ""}}


def stand_in_project(tmp_path, monkeypatch, staging_workspace: str):
    """A copy of the project whose staging target names the stand-in workspace as `staging_workspace` says (YAML lines
    under `workspace:`, `{url}` for the stand-in's), deployed as far as this machine can tell (a wheel in dist/)."""
    server = StandInWorkspace()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    project = tmp_path / "project"
    for d in ("databricks_jobs",): shutil.copytree(ROOT / d, project / d, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    (project / "dist").mkdir(); (project / "dist" / WHEEL).write_bytes(b"stands in for the wheel the deploy builds")
    bundle = project / "databricks_jobs" / "databricks.yml"
    lines = "".join(f"      {line}\n" for line in staging_workspace.format(url=server.url).splitlines())
    bundle.write_text(bundle.read_text().replace("\n  staging:\n", f"\n  staging:\n    workspace:\n{lines}"))
    for var in ("DATABRICKS_HOST", "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET", "DATABRICKS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no-databrickscfg"))
    monkeypatch.setenv("SERVING_MLOPS_BUNDLE", str(bundle))
    monkeypatch.setenv("SERVING_MLOPS_HOME", str(tmp_path / "workspaces"))
    return server


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    "The project with its staging target's host the stand-in workspace, a token in DATABRICKS_TOKEN."
    server = stand_in_project(tmp_path, monkeypatch, "host: {url}")
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-stand-in")
    yield server
    server.shutdown(); server.server_close()


def test_the_workspace_how_to_reaches_the_first_job_run_through_a_profile(tmp_path, monkeypatch):
    "docs/databricks.md's how-to, steps 1-2 and 5: a profile from `databricks auth login`, named by the target; `jobs run` submits with its credentials."
    server = stand_in_project(tmp_path, monkeypatch, "profile: staging")
    try:
        config = tmp_path / "databrickscfg"  # what `databricks auth login --host <url> --profile staging` leaves (a PAT here: no OAuth server)
        config.write_text(f"[staging]\nhost = {server.url}\ntoken = dapi-from-the-profile\n")
        monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(config))
        shown = cli("env", "--env", "staging").stdout
        assert server.url in shown and "profile staging" in shown, shown
        r = cli("jobs", "run", "model_build", "--env", "staging")
        assert "[model_build] submitted run 42: " + server.url in r.stdout and "run 42: SUCCESS" in r.stdout, r.stdout
        assert {auth for _, path, *_, auth in server.requests if path.startswith("/api/")} == {"Bearer dapi-from-the-profile"}
    finally:
        server.shutdown(); server.server_close()


def test_jobs_run_submits_a_one_time_run_to_a_workspace_target(workspace):
    r = cli("jobs", "run", "model_build", "--env", "staging", "-p", "n_trials=3")
    assert "[model_build] submitted run 42: " + workspace.url in r.stdout
    assert "job model_build in staging, run 42: SUCCESS" in r.stdout and "validate: SUCCESS in 90 s" in r.stdout, r.stdout
    body = workspace.submitted
    assert body["run_name"] == "serving-mlops-model-build-staging"
    assert [t["task_key"] for t in body["tasks"]] == ["ingest", "features", "train", "validate"]
    tasks = {t["task_key"]: t for t in body["tasks"]}
    assert "depends_on" not in tasks["ingest"] and tasks["validate"]["depends_on"] == [{"task_key": "train"}]
    files = f"/Workspace/Users/{USER}/.bundle/serving-mlops/staging/files"
    assert tasks["train"]["notebook_task"] == {"notebook_path": f"{files}/notebooks/train",
                                               "base_parameters": {"env_name": "staging", "n_trials": "3", "seed": "42"}}
    validate = tasks["validate"]["notebook_task"]["base_parameters"]
    assert validate["run_id"] == "{{tasks.train.values.run_id}}" and validate["model_uri"] == "{{tasks.train.values.model_uri}}"
    assert tasks["ingest"]["notebook_task"]["base_parameters"]["max_bad_fraction"] == "0.02"  # staging's variable
    carried = tasks["features"]["new_cluster"].pop("spark_env_vars")  # the variables as resolved, for the task's code on the cluster
    assert tasks["features"]["new_cluster"] == {"spark_version": "18.0.x-cpu-ml-scala2.13", "node_type_id": "Standard_D4ds_v5",
                                                "num_workers": 1, "data_security_mode": "SINGLE_USER"}
    assert carried["BUNDLE_VAR_catalog"] == "staging" and carried["BUNDLE_VAR_ingest_max_bad_fraction"] == "0.02"
    assert tasks["features"]["libraries"] == [{"whl": f"/Workspace/Users/{USER}/.bundle/serving-mlops/staging/artifacts/.internal/{WHEEL}"},
                                              {"pypi": {"package": "databricks-feature-engineering>=0.13"}}]
    assert {auth for _, path, *_, auth in workspace.requests if path.startswith("/api/")} == {"Bearer dapi-stand-in"}  # unified auth: DATABRICKS_TOKEN


def test_a_workspace_run_records_each_tasks_values_from_its_notebook_output(workspace, tmp_path):
    "The values each task notebook ended with (runs/get-output of the task's own run) land in run.json where a local run keeps it."
    r = cli("jobs", "run", "model_build", "--env", "staging")
    assert "validate: SUCCESS in 90 s -> {'model_version': '3'}" in r.stdout, r.stdout
    outputs = [q["run_id"] for m, path, q, *_ in workspace.requests if path.endswith("/runs/get-output")]
    assert sorted(outputs) == ["100", "101", "102", "103"]  # the task runs, not the job run 42
    run = json.loads((tmp_path / "workspaces" / "staging" / "jobs" / "model_build" / "42" / "run.json").read_text())
    assert run["state"] == "SUCCESS" and run["environment"] == "staging"
    assert {t["key"]: t["values"] for t in run["tasks"]} == NOTEBOOK_RESULTS
    assert {t["key"]: t["depends_on"] for t in run["tasks"]} == {"ingest": [], "features": ["ingest"], "train": ["features"],
                                                                  "validate": ["train"]}  # the run's graph, from runs/get
    assert [t for t in (tmp_path / "workspaces" / "staging").rglob("*") if t.is_file()] == [tmp_path / "workspaces/staging/jobs/model_build/42/run.json"]


def test_a_failed_workspace_run_is_recorded_too(workspace, tmp_path):
    workspace.outcome = "fail:train"
    cli("jobs", "run", "model_build", "--env", "staging", check=False)
    run = json.loads((tmp_path / "workspaces" / "staging" / "jobs" / "model_build" / "42" / "run.json").read_text())
    assert run["state"] == "FAILED"
    assert [(t["key"], t["state"], t["values"]) for t in run["tasks"]] == [
        ("ingest", "SUCCESS", NOTEBOOK_RESULTS["ingest"]), ("features", "SUCCESS", NOTEBOOK_RESULTS["features"]),
        ("train", "FAILED", {}), ("validate", "UPSTREAM_FAILED", {})]


def test_a_failed_workspace_task_fails_the_run_naming_it_and_its_error(workspace):
    workspace.outcome = "fail:ingest"
    r = cli("jobs", "run", "model_build", "--env", "staging", check=False)
    assert r.returncode == 1
    assert ("job model_build failed in task 'ingest': Workload failed, see run output for details: "
            "IngestError: 120 of 400 rows quarantined") in r.stderr, r.stderr
    assert f"run: {workspace.url}/?o=1#job/1/run/42" in r.stderr and "features: UPSTREAM_FAILED" in r.stderr
    outputs = [q["run_id"] for m, path, q, *_ in workspace.requests if path.endswith("/runs/get-output")]
    assert outputs == ["100"]  # the failed task's own run output, not its skipped dependents'


def test_a_workspace_run_is_waited_for_with_a_bound_then_cancelled(workspace):
    from serving_mlops.jobs import JobFailed, run_job
    workspace.outcome = "hang"
    with pytest.raises(JobFailed, match=r"job ingest in workspace http://127\.0\.0\.1:\d+ \(host from the bundle\) did not finish within 0\.05 minutes: cancelled run 42"):
        run_job(get_environment("staging"), "ingest", progress=False, timeout_minutes=0.05)
    assert [(m, path, body) for m, path, _, body, _ in workspace.requests if path.endswith("/runs/cancel")] == [("POST", "/api/2.2/jobs/runs/cancel", {"run_id": 42})]
