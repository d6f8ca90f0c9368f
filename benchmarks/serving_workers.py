"""Throughput of the serving runtime with several worker processes (`serve --workers N`) against one process and today's previous path.

Run: .venv/bin/python benchmarks/serving_workers.py [--workers 2] [--seconds 10] [--concurrency 8 32] [--client both]

What it does, in one run (about 4 minutes with the defaults on 2 cores):
- builds a throwaway workspace (synthetic clients, feature tables published online), trains (3 Optuna trials) and registers
  a model, and creates one endpoint serving it (features in the request, `dataframe_split` of one row, as
  benchmarks/serving_latency.py sends them);
- runs the same endpoint three ways, one after the other (--rounds R: R times in turn, so that background load changes hit
  every variant alike), restarting the runtime in between (the endpoint is restored):
  (a) the runtime as it starts by default (one process), (b) `--workers N` (N processes on one port with SO_REUSEPORT,
  metrics summed across them), (c) one process with SERVING_MLOPS_FAST_PATH=0 (the path before issue 14: the goal's
  "today's runtime");
- for each, throughput with 8 and 32 concurrent keep-alive connections, from two load generators: the `httpx` client
  threads of benchmarks/serving_latency.py, and a light one (asyncio on uvloop, raw HTTP/1.1 on a socket per connection,
  the requests prepared as bytes): on 2 cores the client's own CPU is part of what is measured, and the light client
  leaves more of the machine to the server. Each phase reports the CPU (cores) of the client, of the server's processes
  and of everything else on the machine;
- checks every response: a 200 whose one prediction equals in-process `pyfunc.predict` of the same row within 1e-9;
- prints the table and issue 14's ratios with PASS/MISS: throughput at 8 clients >= 2 x the previous path (for the
  default runtime and for --workers N), and --workers N against one process at 8 and 32 clients (no target).

The machine is shared by client and server (and whatever else runs): absolute figures move with it, and "other CPU"
shows how much else ran. Exit status 1 if any request failed or any prediction differed.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from serving_latency import CpuMeter, batch_rows, concurrent, light_concurrent, percentiles, pooled, process_tree, say, wait_endpoints  # noqa: E402

def main(rows: int, customers: int, workers: int, seconds: float, warmup: float, concurrency: list, clients: list, trials: int, keep: bool,
         rounds: int = 1) -> int:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    wall_start = time.perf_counter()
    import mlflow
    from databricks.sdk.service.serving import EndpointCoreConfigInput, ServedEntityInput
    from serving_mlops.feature_store import example_workspace
    from serving_mlops.registry import register_challenger
    from serving_mlops.serving.app import serving_token
    from serving_mlops.serving.services import start_server, stop_server, workspace_client
    from serving_mlops.spark import get_spark
    from serving_mlops.train import train

    say(f"building a throwaway workspace with {rows:,} clients (Spark), training ({trials} trials) ...")
    spark = get_spark()
    env, store = example_workspace(rows, seed=3, spark=spark)
    endpoint, runs, started = "bench", {}, False
    try:
        tables = [env.table_name("behaviour_features"), env.table_name("demographic_features")]
        for t in tables: store.publish_table(t)
        version = register_challenger(env, train(env, n_trials=trials, seed=1, store=store, progress=False)).version
        model_name = env.var("model_name")
        uri = f"models:/{model_name}/{version}"
        online = store.online_store()
        spark.stop()
        mlflow.set_tracking_uri(env.tracking_uri); mlflow.set_registry_uri(env.registry_uri)
        pyfunc = mlflow.pyfunc.load_model(uri)
        columns = list(pyfunc.unwrap_python_model().feature_spec["model_columns"])
        records = []
        for cid in range(1, customers + 1):
            found = [online.lookup(t, cid) for t in tables]
            if all(f is not None for f in found):
                merged = {k: v for f in found for k, v in f.items()}
                records.append({"customer_id": cid, "snapshot_date": merged["snapshot_date"],  # the keys the model's signature requires
                                **{c: None if merged[c] is None else float(merged[c]) for c in columns}})
        sent = list(records[0])
        expected = [float(np.asarray(pyfunc.predict(pd.DataFrame([r], columns=sent).astype({c: "float64" for c in columns}))).ravel()[0]) for r in records]
        bodies = [orjson.dumps({"dataframe_split": {"columns": sent, "data": [[r[c] for c in sent]]}}) for r in records]
        token = serving_token(env)
        auth = {"Authorization": f"Bearer {token}"}
        path = f"/serving-endpoints/{endpoint}/invocations"
        say(f"model {uri}; {len(records)} customers cycling; one-row bodies of {statistics.mean(map(len, bodies)):.0f} bytes")

        variants = {"runtime, 1 process": ({}, 1), f"runtime, --workers {workers}": ({}, workers),
                    "previous path (FAST_PATH=0), 1 process": ({"SERVING_MLOPS_FAST_PATH": "0"}, 1)}
        for label, (environ, n) in [v for _ in range(rounds) for v in variants.items()]:  # rounds: every variant meets like load
            os.environ.update(environ)
            info = start_server(env, workers=n); started = True
            w = workspace_client(env)
            if not runs:
                w.serving_endpoints.create_and_wait(endpoint, config=EndpointCoreConfigInput(
                    name=endpoint, served_entities=[ServedEntityInput(entity_name=model_name, entity_version=str(version))]))
            wait_endpoints(w, [endpoint])
            pids = process_tree(info["pid"])
            say(f"{label}: {info['url']} (pids {pids})")
            port = int(info["url"].rsplit(":", 1)[1])
            for client in clients:
                for c in concurrency:
                    say(f"  {client} client, {c} connections, {warmup:g} s warm-up + {seconds:g} s ...")
                    before = batch_rows(info["url"], endpoint, auth)
                    meter = CpuMeter({"runtime": pids})
                    if client == "light": r = light_concurrent(port, path, token, bodies, expected, c, seconds, warmup, meter)
                    else: r = concurrent(info["url"] + path, {**auth, "Content-Type": "application/json"}, bodies, expected, c, seconds, warmup, meter, "runtime")
                    after = batch_rows(info["url"], endpoint, auth)
                    r["batch_rows"] = (after[0] - before[0]) / (after[1] - before[1]) if after[1] > before[1] else float("nan")
                    runs.setdefault((label, client, c), []).append(r)
            stop_server(env); started = False
            for k in environ: os.environ.pop(k, None)
    finally:
        os.environ.pop("SERVING_MLOPS_FAST_PATH", None)
        if started: stop_server(env)
        home = Path(env.root).parent
        if not keep and home.name.startswith("serving-mlops-") and Path(tempfile.gettempdir()) in home.parents: shutil.rmtree(home, ignore_errors=True)
        elif keep: say(f"workspace kept at {home}")

    results = {k: pooled(rs) for k, rs in runs.items()}
    print(f"\nOne-row requests, features in the request; {rounds} round(s) of the variants in turn, figures summed over them; {os.cpu_count()} cores shared by the client and the servers; "
          f"load average at the end {os.getloadavg()[0]:.1f}.\n")
    print("| variant | client | connections | requests/s | p50 | p99 | client CPU | server CPU | server CPU per request | other CPU | rows per model call | errors | mismatches |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (label, client, c), r in results.items():
        p50, p99 = percentiles(r["latencies"]) if len(r["latencies"]) > 1 else (float("nan"),) * 2
        per = f"{r['server_cpu'] / r['rps'] * 1e6:.0f} µs" if r["rps"] else "n/a"
        print(f"| {label} | {client} | {c} | {r['rps']:,.0f} | {p50 / 1000:.2f} ms | {p99 / 1000:.2f} ms | {r['client_cpu']:.2f} | "
              f"{r['server_cpu']:.2f} | {per} | {r['other_cpu']:.2f} | {r['batch_rows']:.2f} | {r['tally'].errors} | {r['tally'].mismatches} |")
    base, one, many = "previous path (FAST_PATH=0), 1 process", "runtime, 1 process", f"runtime, --workers {workers}"
    print("\n| target | measured | goal | result |\n|---|---|---|---|")
    for client in clients:
        for c in concurrency:
            b = results[base, client, c]["rps"]
            for label in (one, many):
                ratio = results[label, client, c]["rps"] / b if b else float("nan")
                goal = c == 8
                print(f"| {label} / previous path, {client} client, {c} connections | {ratio:.2f}x | {'>= 2x' if goal else '(no target)'} | "
                      f"{('PASS' if ratio >= 2 else 'MISS') if goal else '—'} |")
            ratio = results[many, client, c]["rps"] / results[one, client, c]["rps"] if results[one, client, c]["rps"] else float("nan")
            print(f"| --workers {workers} / 1 process, {client} client, {c} connections | {ratio:.2f}x | (no target) | — |")
    problems = {k: r["tally"] for k, r in results.items() if r["tally"].errors or r["tally"].mismatches}
    for k, t in problems.items(): print(f"\n{k}: {t.errors} errors, {t.mismatches} mismatches, e.g. {t.samples}")
    print(f"\nwhole run: {time.perf_counter() - wall_start:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000, help="synthetic clients in the throwaway workspace")
    parser.add_argument("--customers", type=int, default=300, help="distinct customers (1..N) the requests cycle through")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the multi-process variant")
    parser.add_argument("--seconds", type=float, default=10, help="duration of each throughput measurement")
    parser.add_argument("--warmup-seconds", type=float, default=1, help="warm-up before each measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32], help="concurrent keep-alive connections")
    parser.add_argument("--client", choices=["light", "httpx", "both"], default="both",
                        help="load generator: asyncio raw HTTP (light), httpx threads (as serving_latency.py), or both")
    parser.add_argument("--trials", type=int, default=3, help="Optuna trials when training the model")
    parser.add_argument("--rounds", type=int, default=1, help="run the three variants in turn this many times (like load for each)")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway workspace")
    args = parser.parse_args()
    sys.exit(main(args.rows, args.customers, args.workers, args.seconds, args.warmup_seconds, args.concurrency,
                  ["light", "httpx"] if args.client == "both" else [args.client], args.trials, args.keep, args.rounds))
