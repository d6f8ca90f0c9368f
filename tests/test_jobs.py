"""The ingest notebook as a job task: papermill runs it with parameters, as a job runner does."""
import json
import os
from pathlib import Path

import nbformat
import papermill as pm
import pytest
from conftest import ROOT

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
