"""Throughput of data generation and ingest on this machine, against plain pandas reading the same file.

Run: .venv/bin/python benchmarks/ingest_throughput.py [--rows 1000000]
Writes into a throwaway local workspace; prints a Markdown table for docs/benchmarks.md.
"""
import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from serving_mlops.config import get_environment, workspace_home
from serving_mlops.data import write_credit_data
from serving_mlops.ingest import ingest_file
from serving_mlops.tables import tables_for


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(rows: int):
    with workspace_home(tempfile.mkdtemp()) as home:
        env = get_environment("dev")
        path = Path(home) / f"clients_{rows}.csv"
        _, t_gen = timed(lambda: write_credit_data(path, rows, seed=1, bad_fraction=0.001, progress=False))
        _, t_pandas = timed(lambda: pd.read_csv(path, low_memory=False))  # the baseline: reading the file, no validation, no tables
        result, t_first = timed(lambda: ingest_file(path, env, max_bad_fraction=0.05))
        _, t_again = timed(lambda: ingest_file(path, env, max_bad_fraction=0.05))
        tables = tables_for(env)
        assert tables.count(env.table_name("silver_clients")) == result.accepted
        mb = path.stat().st_size / 1e6
    print(f"| generate {rows:,} clients to CSV ({mb:.0f} MB) | {t_gen:.1f} s ({rows / t_gen:,.0f} rows/s) |")
    print(f"| pandas.read_csv of that file (baseline: no validation, no tables) | {t_pandas:.1f} s |")
    print(f"| ingest it: validate, bronze + quarantine + silver + statements ({6 * result.accepted:,} rows) | {t_first:.1f} s ({rows / t_first:,.0f} rows/s) |")
    print(f"| ingest the same file again (merges, no new rows) | {t_again:.1f} s |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    main(parser.parse_args().rows)
