"""Monitoring end to end: traffic through the production endpoint lands in its inference table, and the drift check
raises the alert for a drifted batch of clients and not for a clean one (the issue's demo, as a test)."""
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli

from serving_mlops.config import get_environment
from serving_mlops.data import write_credit_data
from serving_mlops.monitoring.checks import endpoint_metrics
from serving_mlops.naming import inference_table
from serving_mlops.tables import tables_for


def now() -> str: return pd.Timestamp.now(tz="UTC").isoformat()


def wait_for_rows(env, table: str, rows: int, timeout: float = 60) -> int:
    "The row count of `table` once it reaches `rows` (the runtime flushes its inference log every second)."
    deadline, count = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        count = tables_for(env).count(table) if tables_for(env).exists(table) else 0
        if count >= rows: return count
        time.sleep(0.5)
    return count


@pytest.mark.timeout(1800)
def test_a_drifted_batch_through_the_prod_endpoint_raises_the_alert_and_a_clean_one_does_not(home):
    from serving_mlops.deploy import deploy
    from serving_mlops.serving.process import stop_server
    prod = get_environment("prod")
    landing = Path(prod.landing_dir)
    write_credit_data(landing / "history.csv", 3000, seed=3, progress=False)
    from serving_mlops.tasks import features_task, ingest_task, train_task, validate_task
    ingest_task(prod); features_task(prod)  # prod's champion, made in process by the task functions the commands call
    trained = train_task(prod, n_trials=1, seed=1)
    validate_task(prod, trained["run_id"], trained["model_uri"], seed=1, latency_budget_ms=10_000)
    try:
        cli("serve", "--env", "prod", "--background", "--port", "0")
        deploy(prod, "champion")  # the endpoint and its inference table (the endpoint tests are deploy's own tests)
        # new clients arrive (with their outcomes, which ingest needs): 1,000 like the training population, 1,000 younger and riskier
        write_credit_data(landing / "clean.csv", 1000, seed=11, first_id=100_001, progress=False)
        write_credit_data(landing / "drifted.csv", 1000, seed=12, first_id=200_001, drift=1.0, progress=False)
        ingest_task(prod); features_task(prod)  # their features, published online
        payload = inference_table(prod, None, "payload")
        t0 = now(); out = cli("query", "--env", "prod", "--ids", "100001:101000").stdout; t1 = now()
        assert "1,000 customers scored" in out, out
        t2 = now(); cli("query", "--env", "prod", "--ids", "200001:201000"); t3 = now()
        assert wait_for_rows(prod, payload, 2000) == 2000  # every request, once

        clean = cli("monitor", "--env", "prod", "--start", t0, "--end", t1, "--window-minutes", "1", "--labels-table", "silver_clients")
        assert "no drift in" in clean.stdout and "1,000 predictions" in clean.stdout, clean.stdout
        assert "quality" in clean.stdout and "ROC AUC 0." in clean.stdout, clean.stdout  # their outcomes came with the batch
        drifted = cli("monitor", "--env", "prod", "--start", t2, "--end", t3, "--window-minutes", "1", check=False)
        assert drifted.returncode == 3, drifted.stdout + drifted.stderr
        assert "DRIFT" in drifted.stderr and "drift in" in drifted.stderr and "age (psi" in drifted.stderr, drifted.stderr
        report = Path(next(line.split(": ", 1)[1] for line in drifted.stdout.splitlines() if "report (version 1)" in line))
        html = report.read_text()
        assert report.exists() and html.count("<img ") >= 10 and 'class="drifted"' in html

        results = tables_for(prod).read_pandas(inference_table(prod, None, "drift"))
        assert set(results.groupby("window_start").drifted.any()) == {False, True}  # one clean check, one drifted
        written = tables_for(prod).read_pandas(inference_table(prod, None, "metrics"))
        assert len(written) >= 1 and not written.duplicated(["endpoint_name", "served_entity_name", "window_start"]).any()
        metrics = endpoint_metrics(prod, None, t0, t3, 1)  # per minute over the whole traffic
        assert metrics.requests.sum() == 2000 and (metrics.error_rate == 0).all() and (metrics.p99_ms >= metrics.p50_ms).all()
    finally:
        stop_server(prod)
