"""Monitoring end to end: traffic through the production endpoint lands in its inference table (the Databricks AI Gateway
schema, nothing more), and the drift check, which looks the features up as Databricks requires, raises the alert for a
drifted batch of clients and not for a clean one (the issue's demo, as a test); and the parts that make it work on
Databricks too: a complete window despite late rows, and models logged by the FeatureEngineeringClient."""
import re
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli

pytestmark = pytest.mark.slow  # every test: a runtime process, traffic and the drift check on Spark

from serving_mlops.config import get_environment
from serving_mlops.data import write_credit_data
from serving_mlops.monitoring.checks import endpoint_metrics, missing_lookups, monitoring_period, run_monitoring
from serving_mlops.monitoring.inference import as_utc, inference_frame, model_spec, payload_rows, synthetic_entity
from serving_mlops.naming import inference_table
from serving_mlops.serving.capture import PAYLOAD_SCHEMA
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
    from serving_mlops.serving.services import stop_server
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
        t4 = now(); cli("query", "--env", "prod", "--ids", "100801:101300"); t5 = now()  # 200 known clients, 300 keys no feature table has
        assert wait_for_rows(prod, payload, 2500) == 2500  # every request, once
        assert tables_for(prod).schema(payload) == PAYLOAD_SCHEMA and PAYLOAD_SCHEMA.names == [
            "request_date", "databricks_request_id", "client_request_id", "request_time", "status_code", "sampling_fraction",
            "execution_duration_ms", "request", "response", "logging_error_codes", "served_entity_id", "requester"]

        clean = cli("monitor", "--env", "prod", "--start", t0, "--end", t1, "--window-minutes", "1", "--lag-minutes", "0", "--labels-table", "silver_clients")
        assert "no drift in" in clean.stdout and "1,000 predictions" in clean.stdout, clean.stdout
        assert "(rows arrive up to 0 min late: complete until" in clean.stdout, clean.stdout  # the run says which window it checked
        assert "quality" in clean.stdout and "ROC AUC 0." in clean.stdout, clean.stdout  # their outcomes came with the batch
        assert "keys not found" not in clean.stdout, clean.stdout  # every key known: no missing lookups to name
        drifted = cli("monitor", "--env", "prod", "--start", t2, "--end", t3, "--window-minutes", "1", "--lag-minutes", "0", check=False)
        assert drifted.returncode == 3, drifted.stdout + drifted.stderr
        assert "DRIFT: drift found in credit-default-prod: " in drifted.stderr and "of 19 features of version(s) 1" in drifted.stderr, drifted.stderr
        named = re.findall(r"drift in \d+ of 19 features: (\w+) \(", drifted.stdout + drifted.stderr)
        assert len(named) == 1, drifted.stdout + drifted.stderr  # the summary, printed once, names the strongest first
        assert "more (the report has them all)" in drifted.stdout, drifted.stdout  # five named, the rest counted
        report = Path(next(line.split(": ", 1)[1] for line in drifted.stdout.splitlines() if "report (version 1)" in line))
        html = report.read_text()
        assert report.exists() and html.count("<img ") >= 10 and 'class="drifted"' in html
        assert "keys not found" not in drifted.stdout + drifted.stderr  # a drifted population, every key known

        unknown = cli("monitor", "--env", "prod", "--start", t4, "--end", t5, "--window-minutes", "1", "--lag-minutes", "0", check=False)
        assert unknown.returncode == 3, unknown.stdout + unknown.stderr
        assert "500 predictions" in unknown.stdout and ". 300 of 500 rows (60.0%) had keys not found in the feature tables: their features " \
               "are missing, which can explain drift in " in unknown.stdout, unknown.stdout

        from serving_mlops.jobs import past_runs  # each command recorded as a run of the monitoring job, as the console lists it
        runs = sorted(past_runs(prod, "monitoring"), key=lambda r: r.run_id)
        assert [[t.state for t in r.tasks.values()] for r in runs] == [["SUCCESS", "SUCCESS"], ["SUCCESS", "FAILED"], ["SUCCESS", "FAILED"]], runs
        assert all(r.trigger.startswith("serving-mlops monitor --env prod --start") for r in runs) and "DriftAlert: " in runs[1].tasks["drift"].error
        assert (runs[0].parameters["start"], runs[0].parameters["labels_table"]) == (as_utc(t0).isoformat(), "silver_clients"), runs[0].parameters
        assert runs[0].tasks["drift"].values["drifted"] is False and runs[0].tasks["metrics"].values["metrics_windows"] >= 1, runs[0].tasks

        results = tables_for(prod).read_pandas(inference_table(prod, None, "drift"))
        assert set(results.groupby("window_start").drifted.any()) == {False, True}  # one clean check, one drifted
        assert sorted(results.groupby("window_start").missing_lookups.agg(["min", "max"]).itertuples(index=False)) == [(0, 0), (0, 0), (300, 300)]
        # Lakehouse Monitoring's two tables of the unpacked log (test_databricks_contracts: the columns a Databricks monitor writes)
        from serving_mlops.monitoring.metric_tables import drift_metrics_schema, metric_table_names, profile_metrics_schema
        profile_table, drift_table = metric_table_names(inference_table(prod, None, "unpacked"))
        for table, schema in ((profile_table, profile_metrics_schema()), (drift_table, drift_metrics_schema())):
            assert [(f.name, f.type) for f in tables_for(prod).schema(table)] == [(f.name, f.type) for f in schema], table
        drift = tables_for(prod).read_pandas(drift_table)
        starts = drift.window.map(lambda w: w["start"])
        assert starts.nunique() == 3 and (drift.column_name == ":table").sum() == 3  # one per checked window, once each
        tested = drift[drift.ks_test.notna()]
        assert (tested.ks_test.map(lambda t: t["pvalue"]) < 0.01).groupby(starts).any().tolist() == [False, True, True]
        shares = missing_lookups(prod, None, t0, t5, 60)  # what a page reads: per window of the inference table
        assert (shares.rows.sum(), shares.missing_lookups.sum()) == (2500, 300), shares
        written = tables_for(prod).read_pandas(inference_table(prod, None, "metrics"))
        assert len(written) >= 1 and not written.duplicated(["endpoint_name", "served_entity_name", "window_start"]).any()
        metrics = endpoint_metrics(prod, None, t0, t3, 1)  # per minute over the whole traffic
        assert metrics.requests.sum() == 2000 and (metrics.error_rate == 0).all() and (metrics.p99_ms >= metrics.p50_ms).all()
    finally:
        stop_server(prod)


def test_the_hourly_run_checks_a_window_whose_rows_have_all_arrived(home):
    "Databricks delivers inference table rows up to an hour late: the run's period ends `lag` before it, and says so."
    import numpy as np
    prod = get_environment("prod")
    assert prod.var("monitoring_lag_minutes", int) == 60  # the bundle's default
    # the hourly job at 10:05 checks 8:00 to 9:00, not 9:00 to 10:00
    assert monitoring_period(window_minutes=60, lookback_minutes=60, lag_minutes=60, now="2026-01-05 10:05") == \
        (as_utc("2026-01-05 08:00"), as_utc("2026-01-05 09:00"))
    now = pd.Timestamp.now(tz="UTC")
    served = synthetic_entity(prod, prod.var("endpoint_name"), prod.var("model_name"), 1)
    X = pd.DataFrame({"age": np.arange(600, dtype="float64")})
    for start in (now - pd.Timedelta(minutes=180), now - pd.Timedelta(minutes=50)):  # three hours of traffic up to 70 min ago; and the last 50 min
        tables_for(prod).append(inference_table(prod), payload_rows(X, [0.5] * 600, served, start, (130 if start < now - pd.Timedelta(minutes=60) else 50) * 60))
    run = run_monitoring(prod, task="metrics")  # the job's defaults: window 60, lookback 60, lag 60
    assert run.end == (now - pd.Timedelta(minutes=60)).floor("60min") and run.start == run.end - pd.Timedelta(minutes=60), run.summary()
    times = tables_for(prod).read_pandas(inference_table(prod)).request_time
    assert run.metrics.requests.sum() == ((times >= run.start) & (times < run.end)).sum() > 0
    assert "rows arrive up to 60 min late" in run.summary() and "WARNING" not in run.summary(), run.summary()
    local = run_monitoring(prod, task="metrics", lag_minutes=0)  # what the demo does: the local runtime's rows arrive in seconds
    assert local.end == now.floor("60min") or local.end == pd.Timestamp.now(tz="UTC").floor("60min")


def test_a_model_logged_by_the_feature_engineering_client_is_monitored_from_keys(home, tmp_path):
    """A stand-in for a Databricks-logged model (no workspace here): a pyfunc model in the FeatureEngineeringClient's layout, its
    `data/feature_store/feature_spec.yaml` written by the client's own FeatureSpec class; monitoring reads its lookups with that class
    and looks the features up as of each request's time in this environment's feature tables."""
    import mlflow
    from databricks.ml_features_common.entities.column_info import ColumnInfo
    from databricks.ml_features_common.entities.feature_column_info import FeatureColumnInfo
    from databricks.ml_features_common.entities.feature_spec import FeatureSpec
    from databricks.ml_features_common.entities.feature_table_info import FeatureTableInfo
    from databricks.ml_features_common.entities.source_data_column_info import SourceDataColumnInfo
    from serving_mlops.feature_store import example_workspace
    from serving_mlops.spark import get_spark
    from serving_mlops.train import training_set
    env, fs = example_workspace(400, seed=5, spark=get_spark())
    behaviour, demographic = env.table_name("behaviour_features"), env.table_name("demographic_features")
    infos = [ColumnInfo(SourceDataColumnInfo("customer_id"), include=False), ColumnInfo(SourceDataColumnInfo("snapshot_date"), include=False),
             ColumnInfo(FeatureColumnInfo(behaviour, "recent_delay", ["customer_id"], "recent_delay", ["snapshot_date"]), include=True),
             ColumnInfo(FeatureColumnInfo(demographic, "limit_balance", ["customer_id"], "limit", ["snapshot_date"]), include=True)]
    spec = FeatureSpec(infos, [FeatureTableInfo(behaviour, "t1"), FeatureTableInfo(demographic, "t2")], [], 0, "0.18.2",
                       FeatureSpec.SERIALIZATION_VERSION_NUMBER)
    data = tmp_path / "feature_store"
    data.mkdir()
    spec.save(str(data))
    mlflow.set_tracking_uri(env.tracking_uri); mlflow.set_registry_uri(env.registry_uri)
    from serving_mlops.feature_store import in_experiment
    with in_experiment(env, "fe-client-layout"), mlflow.start_run():  # as the client logs it: loader module databricks.feature_store.mlflow_model, data/feature_store/
        info = mlflow.pyfunc.log_model(name="model", loader_module="databricks.feature_store.mlflow_model", data_path=str(data),
                                       registered_model_name=env.var("model_name"), pip_requirements=["databricks-feature-engineering"])
    version = str(info.registered_model_version)
    assert model_spec(env, env.var("model_name"), version) == {"lookups": [
        {"table_name": behaviour, "lookup_key": ["customer_id"], "timestamp_lookup_key": "snapshot_date", "features": {"recent_delay": "recent_delay"}},
        {"table_name": demographic, "lookup_key": ["customer_id"], "timestamp_lookup_key": "snapshot_date", "features": {"limit_balance": "limit"}}],
        "columns": ["recent_delay", "limit"]}
    clients = training_set(env, fs).load_df().toPandas().sort_values("customer_id", ignore_index=True).head(50)
    served = synthetic_entity(env, env.var("endpoint_name"), env.var("model_name"), version)
    rows = payload_rows(clients[["recent_delay", "limit_balance"]], [0.5] * 50, served, "2026-01-05 10:00", 60, keys=clients[["customer_id"]])
    frame = inference_frame(env, rows)  # requests sent only customer_id
    assert frame.customer_id.tolist() == clients.customer_id.tolist() and (frame.model_version == version).all()
    assert frame.recent_delay.tolist() == clients.recent_delay.tolist() and frame.limit.tolist() == clients.limit_balance.tolist()
    assert not frame.missing_lookup.any()  # every key found
    early = inference_frame(env, payload_rows(clients[["recent_delay"]].head(3), [0.5] * 3, served, "2001-01-01", 60, keys=clients[["customer_id"]].head(3)))
    assert early.recent_delay.isna().all() and early.missing_lookup.all()  # before the features existed: nothing found as of the request time
