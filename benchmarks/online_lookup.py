"""Single-key online feature lookups in-process: the SQLite online store against the alternatives a user
would otherwise reach for (a filtered read of the Delta feature table with deltalake, and a pandas
DataFrame indexed by key held in memory).

Run: .venv/bin/python benchmarks/online_lookup.py [--customers 30000] [--lookups 20000]
Builds the dev feature tables in a throwaway local workspace; prints a Markdown table for docs/benchmarks.md.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from serving_mlops.config import get_environment, workspace_home
from serving_mlops.data import write_credit_data
from serving_mlops.feature_store import LocalFeatureStore, build_feature_tables
from serving_mlops.ingest import ingest_landing


def latencies(fn, keys):
    out = []
    for k in keys:
        start = time.perf_counter_ns()
        fn(k)
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def row(label, us):
    q = statistics.quantiles(us, n=100)
    return f"| {label} | {q[49]:.1f} µs | {q[98]:.1f} µs |"


def main(customers: int, lookups: int):
    with workspace_home(tempfile.mkdtemp()):
        env = get_environment("dev")
        write_credit_data(Path(env.landing_dir) / "clients.csv", customers, seed=1, progress=False)
        ingest_landing(env, progress=False)
        fs = LocalFeatureStore(env)
        name = build_feature_tables(env, fs)["behaviour_features"]
        fs.publish_table(name)
        store = fs.online_store()
        keys = np.random.default_rng(0).integers(1, customers + 1, lookups).tolist()
        online = latencies(lambda k: store.lookup(name, k), keys)
        frame = fs.tables.read_pandas(name).set_index("customer_id")
        in_memory = latencies(lambda k: frame.loc[k].to_dict(), keys)
        path = str(fs.tables.path(name))
        from deltalake import DeltaTable
        table = DeltaTable(path)
        delta = latencies(lambda k: table.to_pyarrow_table(filters=[("customer_id", "=", k)]).to_pylist(), keys[:200])
    print(f"{customers:,} customers, {lookups:,} random single-key lookups, one thread:\n")
    print("| lookup | p50 | p99 |\n|---|---|---|")
    print(row("online store (SQLite WAL) `lookup`", online))
    print(row("pandas DataFrame in memory, `.loc[key]`", in_memory))
    print(row("Delta table, filtered read with deltalake (200 lookups)", delta))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=30_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    args = parser.parse_args()
    main(args.customers, args.lookups)
