"""The ingest notebook as a job task: papermill runs it with parameters, as a job runner does."""
import json
import os
from pathlib import Path

import nbformat
import papermill as pm
import pytest
from conftest import ROOT, cli

from serving_mlops.config import get_environment
from serving_mlops.data import write_credit_data
from serving_mlops.tables import tables_for

NOTEBOOK = ROOT / "nbs" / "03_ingest.ipynb"


def test_job_notebook_keeps_its_parameters_cell():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "env_name" in "".join(tagged[0]["source"])


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


def test_spark_reads_what_ingest_wrote(home):
    from serving_mlops.ingest import ingest_landing
    from serving_mlops.tables import get_spark
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


def test_a_failed_task_fails_the_run_naming_task_and_cell_and_skips_its_dependents(home):
    staging = get_environment("staging")
    write_credit_data(Path(staging.landing_dir) / "clients.csv", 400, seed=3, progress=False, bad_fraction=0.3)
    r = cli("jobs", "run", "model_build", "--env", "staging", check=False)
    assert r.returncode == 1
    assert "job model_build failed in task 'ingest': cell" in r.stderr and "of 03_ingest.ipynb raised IngestError" in r.stderr
    (run_dir,) = (staging.root / "jobs" / "model_build").iterdir()
    run = json.loads((run_dir / "run.json").read_text())
    assert [(t["key"], t["state"]) for t in run["tasks"]] == [("ingest", "FAILED"), ("features", "SKIPPED"), ("train", "SKIPPED"), ("validate", "SKIPPED")]
    assert (run_dir / "ingest.ipynb").exists()  # the executed notebook, with the error in its outputs


@pytest.mark.timeout(1800)
def test_build_deploy_promote_loop_with_local_jobs(home):
    "Steps 2-7 of the scenario, offline: model_build and deploy_serving_endpoint in staging, promote into prod; then batch inference in prod."
    from serving_mlops.registry import alias_version
    from serving_mlops.serving import stop_server, workspace_client
    staging, prod = get_environment("staging"), get_environment("prod")
    write_credit_data(Path(staging.landing_dir) / "clients.csv", 3000, seed=3, progress=False)
    try:
        out = cli("jobs", "run", "model_build", "--env", "staging", "-p", "n_trials=1").stdout
        assert "job model_build in staging" in out and "validate: SUCCESS" in out and "{'model_version': '1'}" in out
        (run_dir,) = (staging.root / "jobs" / "model_build").iterdir()
        assert sorted(p.name for p in run_dir.glob("*.ipynb")) == ["features.ipynb", "ingest.ipynb", "train.ipynb", "validate.ipynb"]
        assert int(alias_version(staging, "champion").version) == 1
        cli("jobs", "run", "deploy_serving_endpoint", "--env", "staging")
        ep = workspace_client(staging).serving_endpoints.get("credit-default-staging")
        assert ep.state.ready.value == "READY" and ep.config.served_entities[0].entity_version == "1"
        write_credit_data(Path(prod.landing_dir) / "clients.csv", 3000, seed=4, progress=False)  # production's own data
        cli("ingest", "--env", "prod"); cli("features", "--env", "prod")  # and its features, published online
        out = cli("jobs", "run", "promote", "--env", "prod").stdout
        assert "copy: SUCCESS" in out and "deploy: SUCCESS" in out
        copy = registry_version(prod, 1)
        assert copy.tags["source_environment"] == "staging" and copy.tags["source_version"] == "1"
        out = cli("query", "--env", "prod", "-c", "1", "-c", "2").stdout
        assert "customer 1: probability of default" in out and "served by default_model-1 of endpoint credit-default-prod" in out
        out = cli("jobs", "run", "batch_inference", "--env", "prod").stdout  # the promoted champion over prod's clients
        assert "score: SUCCESS" in out and "'rows': '3000'" in out
        predictions = tables_for(prod).read_pandas(prod.table_name("predictions"))
        assert len(predictions) == 3000 and predictions.customer_id.is_unique and set(predictions.model_version) == {1}
    finally:
        stop_server(staging); stop_server(prod)


def registry_version(env, version):
    from serving_mlops.registry import registry_client
    return registry_client(env).get_model_version(env.var("model_name"), str(version))
