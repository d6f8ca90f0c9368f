"""Latency of the serving runtime under mixed load, with and without 200 clients that never finish their request,
and the cost of one request log write.

Run: PYTHONPATH=. .venv/bin/python benchmarks/serving_limits.py [--seconds 10] [--clients 8] [--stalled 200]

What it does:
- a throwaway local workspace with a tiny pyfunc model (doubles `x`) registered and served by one endpoint of our
  runtime (`start_server`, read timeout 5 s, request log rotated at 1 MB with 3 kept files);
- mixed load for `--seconds` from `--clients` threads (each its own keep-alive httpx.Client): 80% valid one-row
  invocations, 10% invalid ones (400, logged too), 10% control-plane reads (`GET /api/2.0/serving-endpoints/<name>`);
  p50/p99 per kind;
- the same load again while `--stalled` raw connections each send half a request header and nothing more (reopened
  as the runtime cuts them at the read timeout);
- the request log's size and files after both runs, and the in-process cost of one `RequestLog.write` against the
  unbounded append it replaced (`os.write` of the line to an O_APPEND file).
The model costs microseconds, so the figures are the runtime's own overhead; the client shares the machine's cores.
Prints Markdown tables for docs/benchmarks.md.
"""
import argparse
import os
import random
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cloudpickle
import httpx
import mlflow
import orjson
import pandas as pd
from databricks.sdk.service.serving import EndpointCoreConfigInput, ServedEntityInput

from serving_mlops.config import get_environment, workspace_home
from serving_mlops.feature_store import in_experiment
from serving_mlops.serving.app import serving_token
from serving_mlops.serving.services import start_server, stop_server, workspace_client
from serving_mlops.serving.settings import RuntimeSettings
from serving_mlops.serving.request_log import RequestLog, read_request_log

READ_TIMEOUT = 5.0


class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None): return model_input["x"] * 2


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the runtime process cannot import this script


def mixed_load(url: str, token: str, seconds: float, clients: int) -> dict:
    "Latencies in ms per kind of request, from `clients` threads for `seconds`."
    kinds = {"valid": [], "invalid": [], "control": []}
    stop, lock, errors = time.monotonic() + seconds, threading.Lock(), []
    def worker(seed: int):
        rng, mine = random.Random(seed), {k: [] for k in kinds}
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            while time.monotonic() < stop:
                u = rng.random()
                kind = "valid" if u < 0.8 else "invalid" if u < 0.9 else "control"
                start = time.perf_counter()
                if kind == "control": r = client.get(f"{url}/api/2.0/serving-endpoints/limits")
                else: r = client.post(f"{url}/serving-endpoints/limits/invocations",
                                      json={"dataframe_records": [{"x": u} if kind == "valid" else {"y": u}]})
                mine[kind].append((time.perf_counter() - start) * 1000)
                if r.status_code != (400 if kind == "invalid" else 200): errors.append((kind, r.status_code, r.text[:200]))
        with lock:
            for k, v in mine.items(): kinds[k] += v
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads: t.start()
    for t in threads: t.join()
    if errors: raise SystemExit(f"{len(errors)} unexpected answers, e.g. {errors[:3]}")
    return kinds


class Stalled:
    "`n` connections that each send half a request header, reopened as the server closes them (one thread, a selector)."
    def __init__(self, url: str, n: int):
        host, port = url.removeprefix("http://").split(":")
        self.address, self.n, self.stop, self.reopened = (host, int(port)), n, threading.Event(), 0
        self.selector = selectors.DefaultSelector()

    def _open(self):
        s = socket.create_connection(self.address)
        s.sendall(b"POST /serving-endpoints/limits/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        self.selector.register(s, selectors.EVENT_READ)

    def _hold(self):
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                try: data = key.fileobj.recv(1024)
                except ConnectionResetError: data = b""
                if data == b"":  # cut by the server: open another
                    self.selector.unregister(key.fileobj); key.fileobj.close()
                    self._open(); self.reopened += 1

    def __enter__(self):
        for _ in range(self.n): self._open()
        self.thread = threading.Thread(target=self._hold, daemon=True); self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set(); self.thread.join()
        for key in list(self.selector.get_map().values()): key.fileobj.close()
        self.selector.close()


def percentile(values: list, q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else float("nan")


def write_cost(n: int = 20_000) -> tuple[float, float]:
    "Microseconds per request log write: the bounded RequestLog and the unbounded append it replaced."
    outcome = {"databricks_request_id": "8f2a9c1e6c1b4b7e9d0a3f5e2b1c4d6a", "request_time_us": 1764650000000000,
               "served_entity_name": "default_model-1", "status_code": 200, "execution_duration_ms": 1.234, "error_code": None}
    folder = Path(tempfile.mkdtemp())
    log = RequestLog(folder, max_bytes=2**20, files=3)
    start = time.perf_counter()
    for _ in range(n): log.write("bounded", outcome)
    bounded = (time.perf_counter() - start) / n * 1e6
    log.close()
    fd = os.open(folder / "append.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    start = time.perf_counter()
    for _ in range(n): os.write(fd, orjson.dumps(outcome) + b"\n")
    append = (time.perf_counter() - start) / n * 1e6
    os.close(fd)
    return bounded, append


def main(seconds: float, clients: int, stalled: int):
    with workspace_home(tempfile.mkdtemp()):
        env = get_environment("dev")
        with in_experiment(env, "/Shared/limits"), mlflow.start_run():  # artifacts in the workspace
            x = pd.DataFrame({"x": [1.0, 2.0]})
            mlflow.pyfunc.log_model(name="doubler", python_model=Doubler(), registered_model_name="dev.credit.doubler",
                                    signature=mlflow.models.infer_signature(x, x["x"] * 2), pip_requirements=["mlflow"])
        info = start_server(env, settings=RuntimeSettings(read_timeout=READ_TIMEOUT, request_log_mb=1, request_log_files=3))
        try:
            workspace_client(env).serving_endpoints.create_and_wait("limits", config=EndpointCoreConfigInput(
                name="limits", served_entities=[ServedEntityInput(entity_name="dev.credit.doubler", entity_version="1")]))
            token = serving_token(env)
            mixed_load(info["url"], token, 2, clients)  # warm-up
            runs = {"mixed load": mixed_load(info["url"], token, seconds, clients)}
            with Stalled(info["url"], stalled) as held:
                time.sleep(1)
                runs[f"mixed load + {stalled} stalled connections"] = mixed_load(info["url"], token, seconds, clients)
            folder = env.root / "serving" / "requests"
            files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
            kept = len(read_request_log(folder, "limits"))
        finally:
            stop_server(env)
    print(f"\n{clients} clients, {seconds:g} s per run, read timeout {READ_TIMEOUT:g} s; "
          f"stalled connections cut and reopened {held.reopened} times\n")
    print("| run | kind | requests | p50 ms | p99 ms |\n|---|---|---:|---:|---:|")
    for run, kinds in runs.items():
        for kind, ms in kinds.items():
            print(f"| {run} | {kind} | {len(ms)} | {statistics.median(ms):.2f} | {percentile(ms, 0.99):.2f} |")
    print(f"\nrequest log after both runs (rotated at 1 MB, 3 kept): {files}; {kept} outcomes kept")
    bounded, append = write_cost()
    print(f"\n| request log write | µs per request |\n|---|---:|\n| RequestLog.write (bounded, rotated) | {bounded:.1f} |"
          f"\n| unbounded os.write append (before) | {append:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="duration of each load run")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--stalled", type=int, default=200, help="connections that never finish their request")
    args = parser.parse_args()
    main(args.seconds, args.clients, args.stalled)
