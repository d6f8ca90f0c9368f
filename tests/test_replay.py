"""The deployed bundle replayed as Databricks runs it (serving_mlops.replay): the wheel built as the bundle's `artifacts` say,
installed on Databricks Runtime 18.0 ML's library versions, the files laid out as the CLI syncs them, every task notebook of
the loop run in its own folder with `dbutils` and the job cluster's environment.

`make test` runs it among the other modules (`make replay` alone). The runtime's libraries are a virtual environment built once
per version of replay/databricks-runtime-18.0-ml.txt (`make replay-env`, about 2.5 minutes, timed on its own); the loop about
3 minutes. It is also the suite's run of promote, batch inference and monitoring as jobs (tests/test_jobs.py runs model_build
and deploy through the local job runner).
No Databricks workspace exists here: the workspaces' data, models and endpoints are local workspaces on the replay's driver
(see the table in nbs/15b_replay.ipynb and docs/databricks.md).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving_mlops.config import HOME_ENV_VAR, environment_variables, get_environment
from serving_mlops.registry import registry_client
from serving_mlops.tables import tables_for
from serving_mlops.replay import (LOOP, REPLAY_JAVA_ENV_VAR, SMALL, TWO_WORKSPACES, ReplayFailed, canonical, constraints_path,
                                  install_libraries, loop_inputs, replay, replayed_workspace, runtime_packages, runtime_python)
from serving_mlops.jobs import load_jobs

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runtime():
    "Python of the runtime's library set (built once per constraints file)."
    return runtime_python(constraints_path(get_environment("staging")), ROOT / ".venv")


@pytest.fixture(scope="module")
def contracts():
    "The run of the contract tests on the runtime (started by `loop` once the wheel is installed); stopped if left running."
    started = {}
    yield started
    if (proc := started.get("process")) and proc.poll() is None: proc.kill(); proc.wait()


def start_contract_tests(runtime: Path, root: Path) -> subprocess.Popen:
    """tests/test_databricks_adapter.py with the runtime's Python and the wheel the loop installed (no checkout on the path),
    in the background: its output in root/contracts.log."""
    with open(root / "contracts.log", "w") as log:  # the child writes to its own copy of the file
        return subprocess.Popen([str(runtime), "-P", "-m", "pytest", "tests/test_databricks_adapter.py", "-q", "-p", "no:cacheprovider",
                                 "-W", "ignore::DeprecationWarning"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "SERVING_MLOPS_HOME": str(root / "contracts"), "PYTHONPATH": "",
                                     # the runtime's Spark: the replay's JVM flags (the tests' class archive is of another Spark)
                                     "SERVING_MLOPS_SPARK_JAVA_OPTIONS": os.environ.get(REPLAY_JAVA_ENV_VAR, ""),
                                     # and its Python workers the runtime's Python: a Spark this worker started earlier set
                                     # PYSPARK_PYTHON to the suite's, whose MLflow and scikit-learn could not load the runtime's model
                                     "PYSPARK_PYTHON": str(runtime)})


@pytest.fixture(scope="module")
def loop(runtime, contracts, tmp_path_factory):
    """The whole loop, replayed once for the module: (results, the replay's folder). Once its first job installed the wheel
    in the runtime's environment, the contract tests run there beside the loop's next jobs (the loop mostly waits on its
    tasks' processes: one after the other, the two took 204 s + 51 s in the suite)."""
    root = tmp_path_factory.mktemp("replay")
    inputs = loop_inputs(2000, SMALL)
    def before(target: str, job: str, workspaces: Path) -> dict | None:
        if (target, job) != LOOP[0] and not contracts: contracts["process"] = start_contract_tests(runtime, root)
        return inputs(target, job, workspaces)
    return replay(LOOP, root, SMALL, before, target_variables=TWO_WORKSPACES), root


def test_the_runtime_environment_has_the_runtimes_own_versions(runtime):
    "What the constraints file pins is what the environment holds (pip could have resolved something else for a transitive)."
    pinned = dict(re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line).groups()
                  for line in constraints_path(get_environment("staging")).read_text().splitlines() if "==" in line and not line.startswith("#"))
    have = runtime_packages(runtime)
    assert {canonical(n): v for n, v in pinned.items()} == {canonical(n): have.get(canonical(n)) for n in pinned}
    assert have["mlflow-skinny"] == "3.8.1" and have["pyspark"] == "4.1.0" and "mlflow" not in have  # the runtime has MLflow's skinny package


def test_every_task_of_the_loop_succeeds_on_the_runtime(loop):
    results, root = loop
    assert list(results) == LOOP
    states = {f"{t}/{j}/{k}": task.state for (t, j), tasks in results.items() for k, task in tasks.items()}
    assert set(states.values()) == {"SUCCESS"}, states
    validate = results["staging", "model_build"]["validate"].values
    copy = results["prod", "promote"]["copy"].values
    assert results["prod", "promote"]["deploy"].values["model_version"] == copy["model_version"]  # {{tasks.copy.values.model_version}}
    assert results["staging", "deploy_serving_endpoint"]["deploy"].values["endpoint"] == "credit-default-staging"
    assert results["prod", "monitoring"]["drift"].values["drifted"] is False and validate, validate
    with environment_variables({HOME_ENV_VAR: str(replayed_workspace(root, "prod"))}):  # what the tasks left in prod
        prod = get_environment("prod")
        version = registry_client(prod).get_model_version(prod.model_name, copy["model_version"])
        predictions = tables_for(prod).read_pandas(prod.table_name("predictions"))
    with environment_variables({HOME_ENV_VAR: str(replayed_workspace(root, "staging"))}):  # and in staging
        staging = get_environment("staging")
        trained = registry_client(staging).get_run(
            registry_client(staging).get_model_version(staging.model_name, validate["model_version"]).run_id)
        silver = tables_for(staging).version("staging.credit.silver_clients")
    # the training run records the data it trained on: the Delta table and the version ingest wrote
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in trained.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "train", "validation"] and inputs["train"].source_type == "delta_table"
    source = json.loads(inputs["train"].source)
    assert source["delta_table_name"] == "staging.credit.silver_clients" and source["delta_table_version"] == silver
    assert inputs["train"].digest and json.loads(inputs["train"].profile)["num_rows"] == int(trained.data.params["rows_train"])
    train_log = Path(results["staging", "model_build"]["train"].log).read_text()
    assert "trial 1/1: validation ROC AUC " in train_log and "final model: validation ROC AUC " in train_log
    assert "Best trial" not in train_log  # its own progress lines, not Optuna's progress bar
    assert version.tags["source_environment"] == "staging" and version.tags["source_version"] == validate["model_version"]
    assert results["prod", "batch_inference"]["score"].values == {"model_version": str(version.version), "rows": "2000"}
    assert len(predictions) == 2000 and predictions.customer_id.is_unique and set(predictions.model_version) == {int(version.version)}


def test_prod_promotes_staging_champion_from_another_workspace(loop):
    """Issue 26 item 6 in the loop: staging and prod are separate workspaces (nothing of staging in prod's folder); prod's
    promote job reads staging's champion through promote_source_registry = databricks-uc://replay:staging, with the host and
    token MLflow reads from prod's secret scope, over MLflow's Unity Catalog REST calls to staging's registry, and verifies
    the copy on prod's own held-out data."""
    results, root = loop
    copy_log = Path(results["prod", "promote"]["copy"].log).read_text()
    request = json.loads((root / "runs" / "promote" / "copy.request.json").read_text())
    assert set(request["secrets"]["replay"]) == {"staging-host", "staging-token"}  # prod's scope names staging's workspace
    calls = [json.loads(line) for line in (root / "registries" / "staging" / "calls.jsonl").read_text().splitlines()]
    asked = {(c["method"], c["path"].split("/Models/")[0]) for c in calls if not c["path"].startswith("/.well-known")}
    assert ("GET", "/api/2.0/mlflow/unity-catalog/registered-models/alias") in asked  # the champion, by its alias
    assert {("POST", "/api/2.0/mlflow/unity-catalog/model-versions/generate-temporary-credentials"),
            ("GET", "/presigned")} <= asked  # its files, downloaded through default storage's presigned URLs
    assert {c["status"] for c in calls} == {200}, calls  # every call with staging's token (401 otherwise)
    assert not (replayed_workspace(root, "prod") / "staging").exists()  # prod's tasks never read staging's folder
    assert "of 'staging' is prod.credit.default_model version" in copy_log and "identical predictions on" in copy_log


def test_the_tasks_read_the_configuration_the_deployment_gave_them(loop):
    "Issue 26 item 1: each task found the synced databricks.yml beside its notebook's folder, and the --var overrides reached the code."
    results, root = loop
    deploy_log = Path(results["staging", "deploy_serving_endpoint"]["deploy"].log).read_text()
    port = int(re.search(r"invocations: http://127\.0\.0\.1:(\d+)/serving-endpoints/credit-default-staging", deploy_log).group(1))
    assert port != 8712  # serving_port=0 given at deploy time reaches the task only through the cluster's spark_env_vars
    drift_log = Path(results["prod", "monitoring"]["drift"].log).read_text()
    request = json.loads((root / "runs" / "monitoring" / "drift.request.json").read_text())
    assert request["parameters"]["window_minutes"] == "1"  # the run's notebook_params over the base parameter ${var.monitoring_window_minutes}
    files = root / "Workspace/Shared/.bundle/serving-mlops/prod/files"  # prod's workspace.root_path in the bundle (production mode)
    assert (files / "databricks.yml").is_file() and (files / "notebooks" / "monitoring.ipynb").is_file()
    assert not list(files.rglob("*.whl")) and not (files / "dist").exists()  # the wheel is an artifact, not a synced file
    assert "Traceback" not in drift_log
    assert (root / "Workspace/Users/replay@serving-mlops.invalid/.bundle/serving-mlops/staging/files/notebooks/train.ipynb").is_file()


def test_the_databricks_contract_tests_pass_on_the_runtimes_libraries(loop, contracts, runtime):
    """tests/test_databricks_adapter.py again, with the runtime's Python, libraries and the wheel the loop installed (no checkout
    on the path): the feature-engineering client's signatures and entities are 0.13.0.1's, MLflow's schema enforcement 3.8.1's,
    Spark's Arrow conversion 4.1.0's with pandas 2.2.3 and pyarrow 21 (issue 26 items 2 and 4 on the runtime's versions)."""
    returncode, output = contracts["process"].wait(timeout=900), (loop[1] / "contracts.log").read_text()
    assert returncode == 0, output[-6000:]
    assert re.search(r"\b\d+ passed", output) and " skipped" not in output, output[-2000:]
    where = subprocess.run([str(runtime), "-P", "-c", "import serving_mlops, mlflow; print(serving_mlops.__file__, mlflow.__version__)"],
                           cwd=ROOT, capture_output=True, text=True).stdout
    assert "site-packages" in where and where.split()[1] == "3.8.1", where


def test_a_wheel_that_would_change_a_runtime_library_is_refused(runtime, tmp_path):
    "Issue 26 item 7: the job's libraries are pip-installed as a cluster does; a requirement that would upgrade MLflow fails the replay, naming it."
    project = tmp_path / "project"
    (project / "greedy").mkdir(parents=True)
    (project / "greedy" / "__init__.py").write_text("")
    (project / "setup.py").write_text("from setuptools import setup\nsetup(name='greedy', version='1.0', packages=['greedy'], "
                                      "install_requires=['mlflow-skinny>3.8.1'])\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path / "dist"), str(project), "-q"], check=True)
    env = get_environment("staging")
    spec = load_jobs(env)["ingest"]
    for task in spec.tasks.values(): task.libraries = [{"whl": "/Workspace/artifacts/.internal/greedy-1.0-py3-none-any.whl"}]
    (tmp_path / "Workspace" / "artifacts" / ".internal").mkdir(parents=True)
    shutil.copy(tmp_path / "dist" / "greedy-1.0-py3-none-any.whl", tmp_path / "Workspace" / "artifacts" / ".internal")
    with pytest.raises(ReplayFailed, match=r"would change the runtime's own mlflow-skinny 3\.8\.1 -> 3\.\d+"):
        install_libraries(runtime, runtime_packages(runtime), tmp_path, spec, "/Workspace/artifacts")
    assert runtime_packages(runtime)["mlflow-skinny"] == "3.8.1"
    assert "Version: 3.8.1" in subprocess.run([str(runtime), "-m", "pip", "show", "mlflow-skinny"], capture_output=True, text=True).stdout
