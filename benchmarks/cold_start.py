"""Cold start after scale to zero: the first request to a served entity the runtime has unloaded, against warm requests.

Run: .venv/bin/python benchmarks/cold_start.py [--rounds 5] [--requests 200] [--idle-seconds 1]

What it does, in one run (about 1-2 minutes on 2 cores, most of it building the workspace):
- builds a throwaway workspace (synthetic clients, feature tables published online), trains (1 Optuna trial), registers
  the demo's credit model, starts the runtime as a process (`start_server`) with `scale_to_zero_idle_s` set to
  --idle-seconds, and creates one endpoint serving that version with `scale_to_zero_enabled`;
- warm: --requests sequential one-row requests (features in the request, `dataframe_split`), p50 and p99;
- --rounds times: waits until GET says the entity is scaled to zero, then times the first request (the cold start:
  from sending it to its answer, the load on demand included) and the request after it (warm again); the runtime's own
  figure for the load ("loaded on demand in X s", from the served model's server logs) is read too;
- checks every answer: a 200 whose prediction equals in-process `pyfunc.predict` of the same row within 1e-9.

Exit status 1 if any request failed or any prediction differed.
"""
import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from serving_latency import percentiles, say  # noqa: E402


def main(rows: int, rounds: int, requests: int, idle_s: float, keep: bool) -> int:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    wall_start = time.perf_counter()
    import mlflow
    from databricks.sdk.service.serving import EndpointCoreConfigInput, ServedEntityInput
    from serving_mlops.feature_store import example_workspace
    from serving_mlops.registry import register_challenger
    from serving_mlops.serving.app import serving_token
    from serving_mlops.serving.services import start_server, stop_server, workspace_client
    from serving_mlops.serving.settings import RuntimeSettings
    from serving_mlops.spark import get_spark
    from serving_mlops.train import train

    say(f"building a throwaway workspace with {rows:,} clients (Spark), training (1 trial) ...")
    spark = get_spark()
    env, store = example_workspace(rows, seed=3, spark=spark)
    endpoint, started, failures = "cold", False, []
    try:
        tables = [env.table_name("behaviour_features"), env.table_name("demographic_features")]
        for t in tables: store.publish_table(t)
        version = register_challenger(env, train(env, n_trials=1, seed=1, store=store, progress=False)).version
        model_name, online = env.var("model_name"), store.online_store()
        spark.stop()
        mlflow.set_tracking_uri(env.tracking_uri); mlflow.set_registry_uri(env.registry_uri)
        pyfunc = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")
        columns = list(pyfunc.unwrap_python_model().feature_spec["model_columns"])
        merged = {k: v for t in tables for k, v in online.lookup(t, 1).items()}
        row = {"customer_id": 1, "snapshot_date": merged["snapshot_date"],
               **{c: None if merged[c] is None else float(merged[c]) for c in columns}}
        sent = list(row)
        expected = float(np.asarray(pyfunc.predict(pd.DataFrame([row], columns=sent).astype(
            {c: "float64" for c in columns}))).ravel()[0])
        body = orjson.dumps({"dataframe_split": {"columns": sent, "data": [[row[c] for c in sent]]}})

        info = start_server(env, settings=RuntimeSettings(scale_to_zero_idle_s=idle_s)); started = True
        w = workspace_client(env)
        w.serving_endpoints.create_and_wait(endpoint, config=EndpointCoreConfigInput(name=endpoint, served_entities=[
            ServedEntityInput(entity_name=model_name, entity_version=str(version), name="credit",
                              scale_to_zero_enabled=True)]))
        auth = {"Authorization": f"Bearer {serving_token(env)}"}
        client = httpx.Client(base_url=info["url"], headers={**auth, "Content-Type": "application/json"}, timeout=120)

        def call() -> float:
            "One request; its latency in microseconds (a failure or a wrong prediction is noted)."
            start = time.perf_counter()
            r = client.post(f"/serving-endpoints/{endpoint}/invocations", content=body)
            us = (time.perf_counter() - start) * 1e6
            if r.status_code != 200 or abs(r.json()["predictions"][0] - expected) > 1e-9: failures.append(r.text[:300])
            return us

        def scaled() -> bool:
            state = w.serving_endpoints.get(endpoint).config.served_entities[0].state
            return (state.deployment_state_message or "").startswith("Scaled to zero")

        say(f"{requests} warm requests ...")
        for _ in range(20): call()
        warm = [call() for _ in range(requests)]
        colds, after, loads = [], [], []
        for i in range(rounds):
            while not scaled(): time.sleep(0.1)
            colds.append(call()); after.append(call())
            logs = w.serving_endpoints.logs(endpoint, "credit").logs
            loads.append(float(re.findall(r"loaded on demand in ([0-9.]+) s", logs)[-1]))
            say(f"round {i + 1}: cold start {colds[-1] / 1e3:.0f} ms (load {loads[-1] * 1e3:.0f} ms), then "
                f"{after[-1] / 1e3:.2f} ms")
        client.close()
    finally:
        if started: stop_server(env)
        home = Path(env.root).parent
        if not keep and home.name.startswith("serving-mlops-") and Path(tempfile.gettempdir()) in home.parents:
            shutil.rmtree(home, ignore_errors=True)
        elif keep: say(f"workspace kept at {home}")

    p50, p99 = percentiles(warm)
    med = statistics.median
    print(f"\nDemo credit model, one-row requests (features in the request), runtime process with scale_to_zero_idle_s="
          f"{idle_s:g}; {os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.1f}; "
          f"{time.strftime('%Y-%m-%d')}.\n")
    print("| measure | median | min | max |\n|---|---|---|---|")
    print(f"| warm request ({requests}), p50 / p99 | {p50 / 1e3:.2f} ms / {p99 / 1e3:.2f} ms | | |")
    for label, xs in (("cold start: first request after scale to zero", [c / 1e3 for c in colds]),
                      ("of which the load on demand (runtime's log)", [x * 1e3 for x in loads]),
                      ("the request after it", [a / 1e3 for a in after])):
        print(f"| {label} ({rounds}) | {med(xs):.1f} ms | {min(xs):.1f} ms | {max(xs):.1f} ms |")
    print(f"| cold start / warm p50 | {med(colds) / p50:.0f}x | | |")
    if failures: print(f"\n{len(failures)} failed or wrong answers, e.g. {failures[:3]}")
    print(f"\nwhole run: {time.perf_counter() - wall_start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000, help="synthetic clients in the throwaway workspace")
    parser.add_argument("--rounds", type=int, default=5, help="cold starts measured (each after a scale to zero)")
    parser.add_argument("--requests", type=int, default=200, help="warm requests measured")
    parser.add_argument("--idle-seconds", type=float, default=1.0, help="the runtime's scale_to_zero_idle_s")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway workspace")
    args = parser.parse_args()
    sys.exit(main(args.rows, args.rounds, args.requests, args.idle_seconds, args.keep))
