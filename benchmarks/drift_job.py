"""The drift statistics of the monitoring job over a large inference window: `feature_drift` (PSI over every row,
Kolmogorov-Smirnov and chi-squared tests on a fixed-size sample) and, separately, `drift_report_html`.

Run: PYTHONPATH=. .venv/bin/python benchmarks/drift_job.py [--rows 1000000] [--training 30000] [--drift 0.5]
The window is synthetic clients in the raw UCI schema (23 features, 3 of them categorical) plus the predicted
probability of a logistic regression fitted on the training rows; generating and scoring them is timed apart
and not counted. Prints a Markdown table for the README.
"""
import argparse
import time

from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from serving_mlops.data import FEATURE_COLUMNS, LABEL_COLUMN, generate_credit_data
from serving_mlops.monitoring import drift_report_html, drift_summary, feature_drift, training_baseline

CATEGORICAL = ["SEX", "EDUCATION", "MARRIAGE"]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main(rows: int, training_rows: int, drift: float):
    start = time.perf_counter()
    train = generate_credit_data(training_rows, seed=1)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(train[FEATURE_COLUMNS], train[LABEL_COLUMN])
    scored = lambda df: df[FEATURE_COLUMNS].assign(prediction=model.predict_proba(df[FEATURE_COLUMNS])[:, 1])
    training = scored(train)
    window = scored(generate_credit_data(rows, seed=2, drift=drift, labelled=False))
    setup = time.perf_counter() - start

    baseline, t_baseline = timed(training_baseline, training, CATEGORICAL, prediction="prediction")
    results, t_stats = timed(feature_drift, baseline, window, psi_threshold=0.2, pvalue_threshold=0.01)
    page, t_report = timed(drift_report_html, baseline, window, results, title="Drift benchmark")

    features = len(baseline["features"])
    print(f"window of {rows:,} rows (drift={drift}) against a baseline of {training_rows:,} training rows; "
          f"data generation and scoring {setup:.1f} s, not counted\n")
    print("| window rows | features (numeric + categorical) | baseline | statistics (`feature_drift`) | report (`drift_report_html`) |")
    print("|---|---|---|---|---|")
    print(f"| {rows:,} | {features} ({features - len(CATEGORICAL)} + {len(CATEGORICAL)}) | {t_baseline:.2f} s "
          f"| {t_stats:.2f} s | {t_report:.2f} s ({len(page) / 1e6:.1f} MB) |")
    print(f"\n{drift_summary(results)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--training", type=int, default=30_000)
    parser.add_argument("--drift", type=float, default=0.5)
    args = parser.parse_args()
    main(args.rows, args.training, args.drift)
