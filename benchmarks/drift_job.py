"""The monitoring job's drift check over a large inference window: `check_drift` reading 1,000,000 prediction rows
from an endpoint's payload Delta table (the Databricks AI Gateway schema; one request per row, as online traffic logs
them, each sending the model's 23 input columns as `dataframe_split`), resolving their served entity through
system.serving.served_entities, parsing requests and responses with `inference_frame` (DuckDB's JSON reader), computing `feature_drift`
against the model version's training baseline, writing the drift table, the HTML report and the MLflow run. The steps
are also timed one by one. (The model has no feature spec, so nothing is looked up: a lookup of keys as of the
request time is a Spark join, which the monitoring notebooks and tests exercise.)

Run: PYTHONPATH=. .venv/bin/python benchmarks/drift_job.py [--rows 1000000] [--training 30000] [--drift 0.5]
The workspace is a throwaway local one. The window is synthetic clients in the raw UCI schema (23 features, 3 of them
categorical) scored by a logistic regression fitted on the training rows, registered with its baseline; generating,
scoring and writing the payload rows (`payload_rows`, one Delta append) is timed apart and not counted.
Then the whole check once more with today's parser swapped for the orjson loop it replaced (benchmarks/reference_parse.py),
and the goal of issue 14: the whole check over 1,000,000 requests in at most 6 s on the 2-core machine, with the same results
(the check runs three times and the fastest counts; its CPU time is printed beside the wall time).
Prints Markdown tables for docs/benchmarks.md.
"""
import argparse
import os
import tempfile
import sys
import time
from pathlib import Path

import mlflow
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from serving_mlops.config import get_environment, workspace_home
from serving_mlops.data import FEATURE_COLUMNS, LABEL_COLUMN, generate_credit_data
from serving_mlops.feature_store import in_experiment
from serving_mlops.drift import feature_drift, training_baseline, window_buckets
from serving_mlops.monitoring.checks import DriftAlert, check_drift, model_baseline
import serving_mlops.monitoring.inference as inference
from serving_mlops.monitoring.inference import inference_frame, payload_rows, read_payload, synthetic_entity
from serving_mlops.monitoring.report import drift_report_html
from serving_mlops.naming import inference_table
from serving_mlops.tables import tables_for

CATEGORICAL = ["SEX", "EDUCATION", "MARRIAGE"]
START, END = "2026-01-05 10:00", "2026-01-05 11:00"
GOAL_SECONDS, GOAL_ROWS = 6.0, 1_000_000  # issue 14: the whole drift check over 1,000,000 requests in at most 6 s
sys.path.insert(0, str(Path(__file__).parent))
from reference_parse import reference_parse_requests  # noqa: E402


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def cpu_timed(fn):
    "`fn()`, its wall time and the CPU time of this process in it (all threads: on a shared machine the CPU time tells more)."
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(rows: int, training_rows: int, drift: float):
    setup = time.perf_counter()
    with workspace_home(tempfile.mkdtemp(prefix="drift-bench-")): env = get_environment("dev")
    endpoint, name = env.var("endpoint_name"), env.var("model_name")
    train = generate_credit_data(training_rows, seed=1)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(train[FEATURE_COLUMNS], train[LABEL_COLUMN])
    baseline = training_baseline(train[FEATURE_COLUMNS].assign(prediction=model.predict_proba(train[FEATURE_COLUMNS])[:, 1]),
                                 CATEGORICAL, prediction="prediction")
    with in_experiment(env, "/serving-mlops/dev/training"):
        with mlflow.start_run():
            info = mlflow.sklearn.log_model(model, name="model", pip_requirements=["scikit-learn"])
            mlflow.log_dict(baseline, "monitoring/baseline.json")  # as train() logs it next to the model
        version = mlflow.register_model(info.model_uri, name).version
    window = generate_credit_data(rows, seed=2, drift=drift, labelled=False)
    X = window[FEATURE_COLUMNS].astype("float64")
    served = synthetic_entity(env, endpoint, name, version)  # as the runtime records the config it applies
    payload = payload_rows(X, model.predict_proba(X)[:, 1], served, START, 3600, error_share=0.01)
    tables_for(env).append(inference_table(env), payload)
    del payload
    setup = time.perf_counter() - setup

    table, t_read = timed(read_payload, env, endpoint, START, END)
    frame, t_parse = timed(inference_frame, env, table)
    base, t_base = timed(model_baseline, env, version)
    buckets, t_buckets = timed(window_buckets, base, frame)  # counted once, as check_drift does, for the statistics and the report
    results, t_stats = timed(feature_drift, base, frame, 0.2, 0.01, buckets=buckets)
    page, t_report = timed(drift_report_html, base, frame, results, buckets=buckets)
    del table, frame
    def whole_check():
        try: return check_drift(env, endpoint, START, END)
        except DriftAlert as alert: return alert.result

    runs = [cpu_timed(whole_check) for _ in range(3)]  # the best of three: a shared machine slows some runs down
    result, t_check, cpu_check = min(runs, key=lambda run: run[1])
    today = inference.parse_requests
    inference.parse_requests = reference_parse_requests  # the orjson loop, as check_drift ran before issue 14
    try: before, t_before, cpu_before = cpu_timed(whole_check)
    finally: inference.parse_requests = today
    same = before.results.equals(result.results) and before.rows == result.rows  # every statistic, p-value and row count
    load = os.getloadavg()[0]
    print(f"{result.rows[str(version)]:,} prediction rows ({rows:,} requests, 1% failed; drift={drift}) against a baseline of "
          f"{training_rows:,} training rows; {os.cpu_count()} cores, load average {load:.1f}; setup {setup:.0f} s, not counted\n")
    print("| prediction rows | read window (delta-rs) | `inference_frame` | baseline | bucket shares | `feature_drift` | report | whole `check_drift` |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {result.rows[str(version)]:,} | {t_read:.2f} s | {t_parse:.2f} s | {t_base:.2f} s | {t_buckets:.2f} s | {t_stats:.2f} s "
          f"| {t_report:.2f} s ({len(page) / 1e6:.1f} MB) | {t_check:.2f} s |")
    verdict = ("PASS" if t_check <= GOAL_SECONDS else "MISS") if rows == GOAL_ROWS else "n/a (the goal is for 1,000,000)"
    if verdict == "MISS" and cpu_check <= GOAL_SECONDS:  # the check's own work fits; the wall time waited for other processes on the cores
        verdict = f"MISS on wall time (its CPU time {cpu_check:.1f} s fits: the cores were shared, load average {load:.1f})"
    print(f"\n| requests | whole `check_drift`, orjson loop (before) | whole `check_drift`, DuckDB (now, best of 3) | ratio | goal | result | same results |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {rows:,} | {t_before:.2f} s (CPU {cpu_before:.2f} s) | {t_check:.2f} s (CPU {cpu_check:.2f} s) | {t_before / t_check:.1f}x "
          f"| <= {GOAL_SECONDS:.0f} s at {GOAL_ROWS:,} | {verdict} | {'yes' if same else 'NO'} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (CPU time: of every thread of this process, so up to 2x the wall time on 2 cores)")
    print(f"\n{result.summary()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--training", type=int, default=30_000)
    parser.add_argument("--drift", type=float, default=0.5)
    args = parser.parse_args()
    main(args.rows, args.training, args.drift)
