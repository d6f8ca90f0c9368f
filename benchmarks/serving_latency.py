"""One-row scoring latency and throughput of our serving runtime against `mlflow models serve` and in-process pyfunc.

The same registered model version, the same payloads and the same HTTP client for both servers.

Run: .venv/bin/python benchmarks/serving_latency.py [--requests 500] [--seconds 10] [--customers 300] [--omp-threads 1] [--no-baseline]

What it does, in one run (about 2-3 minutes with the defaults on 2 cores):
- builds a throwaway local workspace (synthetic clients; feature tables published to the online store), trains a
  model (3 Optuna trials) and registers it: models:/<model_name>/<version> is what every contender serves;
- starts our runtime (`serving_mlops.serving.services.start_server`, one endpoint serving that version) and
  `mlflow models serve --env-manager local` (1 uvicorn worker, its default), both on 127.0.0.1;
- one-row latency, sequential calls (50 warm-up, then 500 each) for (a) our runtime with all 18 features in the
  request, (b) our runtime with only `{"customer_id": id}` (features looked up in the online store), (c) mlflow serve
  with all features (byte-for-byte the request bodies of (a)), each on its own keep-alive `httpx.Client`, and
  (d) in-process `mlflow.pyfunc.load_model(uri).predict(one_row_df)` (no HTTP), and (e) the floor of HTTP here: a
  do-nothing Starlette app on uvicorn (uvloop, httptools, as the runtime) that reads the body and returns a fixed JSON.
  They take turns in chunks of 50 calls, so that a change in background load on the machine hits them alike, in two
  phases: (a), (b), the runtime with its inference table and (e) first, with (a), (b) and (e) also from a raw-socket
  HTTP/1.1 client (a few microseconds of client work per call: httpx spends several hundred microseconds of CPU per
  call, which on 2 cores leaves the server colder for the next request; the floor comparison is printed for both
  clients); then (a) again with (c) and (d), whose scikit-learn calls leave OpenMP threads spinning after each call
  (they would take CPU from the floor comparison);
- first (unless --no-baseline), the same latency and throughput runs against the runtime started with
  SERVING_MLOPS_FAST_PATH=0: today's path before issue 14 (no tree compiler, every request scored on the predicting
  thread), for comparison in the same run; then the runtime is restarted with its defaults for everything below;
- the same version on a second endpoint whose inference table is enabled (every request and response captured to
  Delta through the write-ahead log) takes part in the latency and throughput runs, so the cost of capture shows
  as the difference; at the end the payload table must hold every answered request;
- throughput with 8 and 32 concurrent clients (threads, each its own keep-alive `httpx.Client`; the same code for
  both servers), with the CPU used by the client, the server and everything else on the machine, and the runtime's
  Prometheus histogram `serving_model_batch_rows` (rows per model call, i.e. micro-batching under concurrency);
- checks that every response is a 200 whose prediction equals in-process `pyfunc.predict` of the same row within
  1e-9, counts errors and mismatches, and prints Markdown tables with PASS/MISS against the targets:
  runtime p50 <= 0.5 x mlflow serve p50; runtime throughput >= 3 x mlflow serve at 8 clients; runtime p50 at most
  1 ms above in-process pyfunc; key-only p50 at most 0.3 ms above features-in-request p50; and issue 14's: runtime p50
  (features, and key only) at most 0.5 ms above the do-nothing app's, p99 at most 2 x p50 (with each client); inference table throughput
  >= 0.95 x the same endpoint without it at every concurrency; runtime throughput at 8 clients >= 2 x the baseline's.

Both servers and the client share this machine's cores, so absolute numbers depend on it and on whatever else runs
(the "other CPU" figures show that); the ratios are the point. `--omp-threads N` exports OMP_NUM_THREADS=N to this
process and both servers (a diagnostic: the default leaves the environment as it is). Exit status 1 if any request
failed or any prediction differed.
"""
import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pandas as pd

TOLERANCE = 1e-9
LABELS = {"runtime": "runtime", "captured": "runtime with inference table", "mlflow": "mlflow models serve",
          "baseline runtime": "baseline runtime (FAST_PATH=0)", "baseline captured": "baseline runtime with inference table (FAST_PATH=0)"}
VERSUS = "runtime, features in request (in turns with mlflow serve and pyfunc)"
RAW = "raw-socket client"  # the latency targets measured again with `RawTarget`
ECHO_APP = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
async def invocations(request):
    await request.body()
    return Response(b'{"predictions": [0.5]}', media_type="application/json")
async def ping(request): return Response(b"ok")
app = Starlette(routes=[Route("/invocations", invocations, methods=["POST"]), Route("/ping", ping)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def say(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- CPU time of processes (Linux /proc), to see who is busy during a throughput run ---

def _cpu_seconds(pid: int) -> float:
    try: fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError): return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def _children(pid: int) -> list:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try: out += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError): pass
    return out


def process_tree(pid: int) -> list:
    "`pid` and its descendants."
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def cpu_seconds(pids: list) -> float: return sum(_cpu_seconds(p) for p in pids)


def busy_seconds() -> float:
    "CPU seconds all processes of the machine have used (all cores), from /proc/stat."
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / CLOCK_TICKS  # user nice system, irq softirq steal


class CpuMeter:
    "CPU use (in cores) during a phase: this process (the client), the servers' process trees and everything else."
    def __init__(self, servers: dict):
        self.servers = servers  # name -> pids

    def __enter__(self):
        self.start = (time.perf_counter(), time.process_time(), busy_seconds(), {n: cpu_seconds(p) for n, p in self.servers.items()})
        return self

    def __exit__(self, *exc):
        wall, client, busy, servers = self.start
        wall = time.perf_counter() - wall
        self.client = (time.process_time() - client) / wall
        self.server = {n: (cpu_seconds(p) - servers[n]) / wall for n, p in self.servers.items()}
        self.other = max(0.0, (busy_seconds() - busy) / wall - self.client - sum(self.server.values()))


# --- the client: identical code for both servers ---

def check_answer(status: int, content: bytes, expected: float) -> str | None:
    "None if an answer of HTTP `status` with body `content` is a 200 with one prediction equal to `expected`, else what is wrong."
    if status != 200: return f"HTTP {status}: {content[:200]!r}"
    try: predictions = orjson.loads(content)["predictions"]
    except (orjson.JSONDecodeError, TypeError, KeyError): return f"HTTP 200 without predictions: {content[:200]!r}"
    if isinstance(predictions, dict): predictions = next(iter(predictions.values()))  # (a named-output model)
    if not isinstance(predictions, list) or len(predictions) != 1: return f"unexpected predictions {predictions!r:.200}"
    got = predictions[0]
    if isinstance(got, dict): got = next(iter(got.values()))
    if not isinstance(got, (int, float)) or abs(got - expected) > TOLERANCE: return f"prediction {got!r} != {expected!r}"
    return None


class Tally:
    "Errors (non-200 or transport) and mismatching predictions, with the first few messages."
    def __init__(self):
        self.errors, self.mismatches, self.samples, self.lock = 0, 0, [], threading.Lock()
        self.answered = 0  # responses with status 200

    def answer(self):
        with self.lock: self.answered += 1

    def add(self, problem: str):
        with self.lock:
            if problem.startswith(("HTTP", "transport")): self.errors += 1
            else: self.mismatches += 1
            if len(self.samples) < 3: self.samples.append(problem)

    def merge(self, other: "Tally"):
        self.errors += other.errors; self.mismatches += other.mismatches; self.answered += other.answered
        self.samples += other.samples[:3 - len(self.samples)]


def record(tally: Tally, status: int, content: bytes, expected: float, checked: bool = True) -> bool:
    "Counts one answer in `tally`: True if it is a 200 carrying (when `checked`) the prediction `expected`."
    if status == 200: tally.answer()
    problem = check_answer(status, content, expected) if checked else None if status == 200 else f"HTTP {status}: {content[:200]!r}"
    if problem: tally.add(problem)
    return problem is None


def post(client: httpx.Client, url: str, body: bytes, expected: float, tally: Tally, checked: bool = True) -> bool:
    try: response = client.post(url, content=body)
    except httpx.HTTPError as e: tally.add(f"transport {type(e).__name__}: {e}"); return False
    return record(tally, response.status_code, response.content, expected, checked)


CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


def raw_requests(url: str, headers: dict, bodies: list) -> list:
    "Each body as the bytes of one HTTP/1.1 keep-alive POST to `url` with `headers`, for a raw-socket client."
    parts = httpx.URL(url)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{parts.host}:{parts.port}", "Content-Type": "application/json", **headers}.items())
    return [f"POST {parts.raw_path.decode()} HTTP/1.1\r\n{head}Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]


def parse_head(head: bytes) -> tuple[int, int]:
    "The status and content length of a response head (through its blank line)."
    return int(head[9:12]), int(CONTENT_LENGTH.search(head).group(1))


class HttpTarget:
    "One-row requests to `url` on one keep-alive client (`checked`: its predictions must be the model's)."
    def __init__(self, url: str, headers: dict, bodies: list, expected: list, checked: bool = True):
        self.client, self.url, self.bodies, self.expected, self.checked = httpx.Client(headers=headers, timeout=30), url, bodies, expected, checked

    def __call__(self, k: int, tally: Tally): post(self.client, self.url, self.bodies[k], self.expected[k], tally, self.checked)

    def close(self): self.client.close()


class RawTarget:
    "The same requests as `HttpTarget` from a raw HTTP/1.1 client on one keep-alive socket: a few microseconds of client work per call instead of httpx's hundreds."
    def __init__(self, url: str, headers: dict, bodies: list, expected: list, checked: bool = True):
        parts, self.requests = httpx.URL(url), raw_requests(url, headers, bodies)
        self.socket = socket.create_connection((parts.host, parts.port))
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file, self.expected, self.checked = self.socket.makefile("rb"), expected, checked

    def __call__(self, k: int, tally: Tally):
        self.socket.sendall(self.requests[k])
        head = b"".join(iter(lambda: self.file.readline(), b"\r\n")) + b"\r\n"
        status, length = parse_head(head)
        record(tally, status, self.file.read(length), self.expected[k], self.checked)

    def close(self): self.file.close(); self.socket.close()


class PyfuncTarget:
    "In-process `pyfunc.predict` of one-row frames (no HTTP)."
    def __init__(self, pyfunc, frames: list, expected: list):
        self.pyfunc, self.frames, self.expected = pyfunc, frames, expected

    def __call__(self, k: int, tally: Tally):
        got = float(np.asarray(self.pyfunc.predict(self.frames[k])).ravel()[0])
        if abs(got - self.expected[k]) > TOLERANCE: tally.add(f"prediction {got!r} != {self.expected[k]!r}")

    def close(self): pass


def sequential(targets: dict, n: int, requests: int, warmup: int, chunk: int) -> tuple[dict, dict]:
    """Latencies (µs) of `requests` one-row calls per target, one call at a time, after `warmup` calls each.
    Targets take turns in chunks of `chunk` calls (the order rotating each round), so that a change of background load
    on the machine affects them alike, while each target still sees runs of back-to-back requests."""
    latencies, tallies = {label: [] for label in targets}, {label: Tally() for label in targets}
    for label, call in targets.items():
        for i in range(warmup): call(i % n, Tally())
    labels, done, rnd = list(targets), 0, 0
    while done < requests:
        size = min(chunk, requests - done)
        for label in labels[rnd % len(labels):] + labels[:rnd % len(labels)]:
            call, out, tally = targets[label], latencies[label], tallies[label]
            for i in range(done, done + size):
                k = (warmup + i) % n
                start = time.perf_counter_ns()
                call(k, tally)
                out.append((time.perf_counter_ns() - start) / 1000)
        done += size; rnd += 1
    return latencies, tallies


def concurrent(url: str, headers: dict, bodies: list, expected: list, clients: int, seconds: float, warmup: float,
               meter: CpuMeter, server: str) -> dict:
    "Requests/s of `clients` threads (each its own keep-alive client) sending one-row requests back to back."
    begin = time.perf_counter() + warmup
    end = begin + seconds
    counts, latencies, tallies = [0] * clients, [[] for _ in range(clients)], [Tally() for _ in range(clients)]

    def worker(i: int):
        with httpx.Client(headers=headers, timeout=60) as client:
            k = i * 7919
            while True:
                j = k % len(bodies); k += 1
                start = time.perf_counter()
                ok = post(client, url, bodies[j], expected[j], tallies[i] if start >= begin else Tally())
                done = time.perf_counter()
                if done >= end: break
                if start >= begin:
                    counts[i] += ok
                    latencies[i].append((done - start) * 1e6)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads: t.start()
    time.sleep(max(0.0, begin - time.perf_counter()))
    with meter: time.sleep(max(0.0, end - time.perf_counter()))
    for t in threads: t.join()
    tally = Tally()
    for t in tallies: tally.merge(t)
    return {"rps": sum(counts) / seconds, "ok": sum(counts), "latencies": [x for l in latencies for x in l], "tally": tally,
            "client_cpu": meter.client, "server_cpu": meter.server[server], "other_cpu": meter.other + sum(
                v for n, v in meter.server.items() if n != server)}


async def _connection(port: int, requests: list, expected: list, k: int, begin: float, end: float, tally: Tally, latencies: list) -> int:
    "One keep-alive connection sending `requests` back to back until `end`; the checked answers after `begin`."
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ok = 0
    try:
        while True:
            j = k % len(requests); k += 1
            start = time.perf_counter()
            writer.write(requests[j])
            status, length = parse_head(await reader.readuntil(b"\r\n\r\n"))
            body = await reader.readexactly(length)
            done = time.perf_counter()
            if done >= end: break
            if start < begin: continue
            latencies.append((done - start) * 1e6)
            ok += record(tally, status, body, expected[j])
    finally: writer.close()
    return ok


def light_concurrent(port: int, path: str, token: str, bodies: list, expected: list, clients: int, seconds: float, warmup: float,
                     meter: CpuMeter, server: str = "runtime") -> dict:
    "Requests/s of `clients` keep-alive connections driven by one asyncio (uvloop) loop, raw HTTP/1.1."
    import uvloop
    requests = raw_requests(f"http://127.0.0.1:{port}{path}", {"Authorization": f"Bearer {token}"}, bodies)
    tally, latencies = Tally(), []

    async def run():
        begin = time.perf_counter() + warmup
        end = begin + seconds
        tasks = [asyncio.ensure_future(_connection(port, requests, expected, i * 7919, begin, end, tally, latencies)) for i in range(clients)]
        await asyncio.sleep(max(0.0, begin - time.perf_counter()))
        with meter: await asyncio.sleep(max(0.0, end - time.perf_counter()))
        return sum(await asyncio.gather(*tasks))

    ok = uvloop.run(run())
    return {"rps": ok / seconds, "ok": ok, "latencies": latencies, "tally": tally, "client_cpu": meter.client,
            "server_cpu": meter.server[server], "other_cpu": meter.other + sum(
                v for n, v in meter.server.items() if n != server)}


def pooled(runs: list) -> dict:
    "The runs of one measurement over several rounds as one: requests/s and CPU averaged, latencies and tallies pooled."
    tally = Tally()
    for r in runs: tally.merge(r["tally"])
    mean = lambda k: statistics.mean(r[k] for r in runs)
    return {"rps": mean("rps"), "latencies": [x for r in runs for x in r["latencies"]], "tally": tally, "client_cpu": mean("client_cpu"),
            "server_cpu": mean("server_cpu"), "other_cpu": mean("other_cpu"),
            **({"batch_rows": mean("batch_rows")} if all("batch_rows" in r for r in runs) else {})}


# --- the runtime's Prometheus metrics ---

def batch_rows(base_url: str, endpoint: str, headers: dict) -> tuple[float, float]:
    "(sum, count) of the endpoint's serving_model_batch_rows histogram (rows per model call)."
    text = httpx.get(f"{base_url}/api/2.0/serving-endpoints/{endpoint}/metrics", headers=headers, timeout=30).text
    total = {"sum": 0.0, "count": 0.0}
    for kind, value in re.findall(r"^serving_model_batch_rows_(sum|count)\{[^}]*\} (\S+)$", text, re.M):
        total[kind] += float(value)
    return total["sum"], total["count"]


def percentiles(us: list) -> tuple[float, float]:
    q = statistics.quantiles(us, n=100)
    return q[49], q[98]


# --- mlflow models serve ---

def start_mlflow_serve(uri: str, env, port: int, workers: int, log_path: Path) -> subprocess.Popen:
    "`mlflow models serve` of `uri` in its own session (so that it and its uvicorn child stop together)."
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` runs `uvicorn` from PATH
    environ = {**os.environ, "MLFLOW_TRACKING_URI": env.tracking_uri, "MLFLOW_REGISTRY_URI": env.registry_uri,
               "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
               "-p", str(port), "-h", "127.0.0.1", "--workers", str(workers)]
    with open(log_path, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ,
                                start_new_session=True)


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 180) -> float:
    "Seconds until GET `url` answers 200."
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with status {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200: return time.monotonic() - start
        except httpx.HTTPError: pass
        time.sleep(0.2)
    raise TimeoutError(f"mlflow models serve did not answer {url} within {timeout:g} s; see {log_path}")


def start_echo(port: int, log_path: Path) -> subprocess.Popen:
    "The floor of HTTP: a do-nothing Starlette app on uvicorn that reads the body and answers a fixed JSON."
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", ECHO_APP, str(port)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_endpoints(w, names: list, timeout: float = 180):
    "Wait until every endpoint in `names` is ready (after a restart, the runtime restores and loads them)."
    deadline = time.monotonic() + timeout
    for name in names:
        while str(getattr(w.serving_endpoints.get(name).state.ready, "value", "")) != "READY":
            if time.monotonic() > deadline: raise TimeoutError(f"endpoint {name} not ready within {timeout:g} s")
            time.sleep(0.3)


def stop_process_group(proc: subprocess.Popen, timeout: float = 15):
    "SIGTERM the session we started for `proc` (mlflow and its uvicorn child), SIGKILL after `timeout`."
    if proc.poll() is None:
        try: os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError: return
        try: proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    try: os.killpg(proc.pid, 0)  # a child may outlive its parent: make sure the group is gone
    except ProcessLookupError: return
    time.sleep(1)
    try: os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError: pass


# --- the benchmark ---

def main(rows: int, customers: int, requests: int, warmup: int, chunk: int, seconds: float, warmup_seconds: float,
         trials: int, concurrency: list, payload: str, mlflow_workers: int, omp_threads: int | None, keep: bool,
         baseline: bool = True, rounds: int = 3, client: str = "httpx"):
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if omp_threads:  # before scikit-learn loads OpenMP; inherited by both servers
        os.environ["OMP_NUM_THREADS"] = str(omp_threads)
    wall_start = time.perf_counter()
    import mlflow
    from serving_mlops.feature_store import example_workspace
    from serving_mlops.registry import register_challenger
    from serving_mlops.serving.app import serving_token
    from serving_mlops.serving.services import start_server, stop_server, workspace_client
    from serving_mlops.spark import get_spark
    from serving_mlops.train import train

    say(f"building a throwaway workspace with {rows:,} clients (Spark) ...")
    spark = get_spark()
    env, store = example_workspace(rows, seed=3, spark=spark)
    mlflow_proc, echo_proc, runtime_started, endpoint, captured = None, None, False, "bench", "bench-captured"
    try:
        tables = [env.table_name("behaviour_features"), env.table_name("demographic_features")]
        for t in tables: store.publish_table(t)
        say(f"training ({trials} trials) and registering the model ...")
        version = register_challenger(env, train(env, n_trials=trials, seed=1, store=store, progress=False)).version
        model_name = env.var("model_name")
        uri = f"models:/{model_name}/{version}"
        online = store.online_store()
        spark.stop()  # nothing below needs Spark: free its CPU and memory for the servers
        say(f"model {uri} in {time.perf_counter() - wall_start:.0f} s; starting both servers ...")

        mlflow_port = free_port()
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        log_path = env.path("serving", create=True) / "mlflow-serve.log"
        mlflow_proc = start_mlflow_serve(uri, env, mlflow_port, mlflow_workers, log_path)
        echo_port = free_port()
        echo_proc = start_echo(echo_port, env.path("serving", create=True) / "echo.log")
        if baseline: os.environ["SERVING_MLOPS_FAST_PATH"] = "0"  # the runtime started first serves today's path
        info = start_server(env)
        runtime_started = True
        from databricks.sdk.service.serving import AiGatewayConfig, EndpointCoreConfigInput, ServedEntityInput
        from serving_mlops.deploy import inference_table_config
        from serving_mlops.naming import inference_table
        w = workspace_client(env)
        for name in (endpoint, captured):  # the same version twice: without and with an inference table
            w.serving_endpoints.create_and_wait(name, config=EndpointCoreConfigInput(
                name=name, served_entities=[ServedEntityInput(entity_name=model_name, entity_version=str(version))]),
                ai_gateway=AiGatewayConfig(inference_table_config=inference_table_config(env, name)) if name == captured else None)
        auth = {"Authorization": f"Bearer {serving_token(env)}"}
        headers = {**auth, "Content-Type": "application/json"}
        token = serving_token(env)

        def load(url: str, clients: int, meter: dict, server: str = "runtime") -> dict:
            "One throughput run against `url`: the light client for the runtime when asked, httpx threads otherwise."
            if client == "light" and server == "runtime":
                port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
                return light_concurrent(port, "/" + url.split("://", 1)[1].split("/", 1)[1], token, feature_bodies, expected, clients, seconds,
                                        warmup_seconds, CpuMeter(meter), server)
            return concurrent(url, headers, feature_bodies, expected, clients, seconds, warmup_seconds, CpuMeter(meter), server)

        runtime_url = f"{info['url']}/serving-endpoints/{endpoint}/invocations"
        captured_url = f"{info['url']}/serving-endpoints/{captured}/invocations"
        say(f"runtime at {info['url']} (pid {info['pid']}), endpoint '{endpoint}' ready")

        # rows of features from the online store, and in-process predictions as the reference
        mlflow.set_tracking_uri(env.tracking_uri); mlflow.set_registry_uri(env.registry_uri)
        pyfunc = mlflow.pyfunc.load_model(uri)
        columns = list(pyfunc.unwrap_python_model().feature_spec["model_columns"])
        ids, records = [], []
        for cid in range(1, customers + 1):
            found = [online.lookup(t, cid) for t in tables]
            if any(f is None for f in found): continue
            merged = {k: v for f in found for k, v in f.items()}
            # the keys too: the model's signature requires them (as a feature-engineering client's model does), features are optional
            records.append({"customer_id": cid, "snapshot_date": merged["snapshot_date"],
                            **{c: None if merged[c] is None else float(merged[c]) for c in columns}})
            ids.append(cid)
        if not ids: raise RuntimeError(f"none of customers 1..{customers} is in the online store")
        sent = list(records[0])  # the request's columns: keys, then the model's
        frames = [pd.DataFrame([r], columns=sent).astype({c: "float64" for c in columns}) for r in records]
        expected = [float(np.asarray(pyfunc.predict(f)).ravel()[0]) for f in frames]
        if payload == "split":
            feature_bodies = [orjson.dumps({"dataframe_split": {"columns": sent, "data": [[r[c] for c in sent]]}}) for r in records]
        else:
            feature_bodies = [orjson.dumps({"dataframe_records": [r]}) for r in records]
        key_bodies = [orjson.dumps({"dataframe_records": [{"customer_id": r["customer_id"], "snapshot_date": r["snapshot_date"]}]}) for r in records]
        nulls = sum(r[c] is None for r in records for c in columns)
        say(f"{len(ids)} customers, {len(columns)} feature columns ({nulls} null values), payload dataframe_{payload} "
            f"of {statistics.mean(map(len, feature_bodies)):.0f} bytes (key-only {statistics.mean(map(len, key_bodies)):.0f})")

        baseline_latency, baseline_tallies, baseline_throughput = {}, {}, {}
        if baseline:
            say("baseline: the runtime with SERVING_MLOPS_FAST_PATH=0 (no tree compiler, no inline scoring) ...")
            base_targets = {"baseline runtime, features in request": HttpTarget(runtime_url, headers, feature_bodies, expected),
                            "baseline runtime, key only (online lookup)": HttpTarget(runtime_url, headers, key_bodies, expected)}
            base_meter = {"runtime": process_tree(info["pid"])}
            try: baseline_latency, baseline_tallies = sequential(base_targets, len(ids), requests, warmup, chunk)
            finally:
                for t in base_targets.values(): t.close()
            for clients in concurrency:
                for name, url in (("baseline runtime", runtime_url), ("baseline captured", captured_url)):
                    say(f"throughput: {name}, {clients} concurrent clients, {warmup_seconds:g} s warm-up + {seconds:g} s ...")
                    baseline_throughput[name, clients] = load(url, clients, base_meter)
            say("restarting the runtime with its defaults ...")
            stop_server(env)
            del os.environ["SERVING_MLOPS_FAST_PATH"]
            info = start_server(env)  # on a new port
            w = workspace_client(env)
            runtime_url = f"{info['url']}/serving-endpoints/{endpoint}/invocations"
            captured_url = f"{info['url']}/serving-endpoints/{captured}/invocations"
            wait_endpoints(w, [endpoint, captured])
        ready = wait_ready(mlflow_proc, f"{mlflow_url}/ping", log_path)
        mlflow_invocations = f"{mlflow_url}/invocations"
        say(f"mlflow models serve at {mlflow_url} answered /ping {ready:.1f} s after launch (pid {mlflow_proc.pid})")
        wait_ready(echo_proc, f"http://127.0.0.1:{echo_port}/ping", env.path("serving") / "echo.log")
        runtime_pids = process_tree(info["pid"])
        mlflow_pids = process_tree(mlflow_proc.pid)

        servers = {"runtime": runtime_pids, "mlflow": mlflow_pids}

        # 1. one-row latency, sequential, in two phases: the runtime against the floor of HTTP, then against mlflow serve and
        # in-process pyfunc (whose scikit-learn calls run OpenMP threads that keep spinning after a call and would take
        # CPU from whichever contender comes next in the turns)
        echo_url = f"http://127.0.0.1:{echo_port}/invocations"
        RAW_TARGETS = [("runtime, features in request", runtime_url, feature_bodies, True),  # the floor comparison again, another client
                       ("runtime, key only (online lookup)", runtime_url, key_bodies, True),
                       ("do-nothing Starlette app (the floor of HTTP)", echo_url, feature_bodies, False)]
        phases = [{"runtime, features in request": HttpTarget(runtime_url, headers, feature_bodies, expected),
                   "runtime, key only (online lookup)": HttpTarget(runtime_url, headers, key_bodies, expected),
                   "runtime with inference table, features in request": HttpTarget(captured_url, headers, feature_bodies, expected),
                   "do-nothing Starlette app (the floor of HTTP)": HttpTarget(echo_url, headers, feature_bodies, expected, checked=False),
                   **{f"{label} ({RAW})": RawTarget(url, headers, bodies, expected, checked) for label, url, bodies, checked in RAW_TARGETS}},
                  {VERSUS: HttpTarget(runtime_url, headers, feature_bodies, expected),
                   "mlflow models serve, features in request": HttpTarget(mlflow_invocations, headers, feature_bodies, expected),
                   "in-process pyfunc.predict (no HTTP)": PyfuncTarget(pyfunc, frames, expected)}]
        latency, tallies = {}, {}
        with CpuMeter(servers) as latency_cpu:
            for targets in phases:
                say(f"latency: {warmup} warm-up + {requests} sequential one-row calls for each of {len(targets)} targets "
                    f"({', '.join(targets)}), taking turns in chunks of {chunk} ...")
                try:
                    got, counted = sequential(targets, len(ids), requests, warmup, chunk)
                    latency.update(got); tallies.update(counted)
                finally:
                    for t in targets.values(): t.close()

        # 2. throughput under concurrency: the runtime's two endpoints `rounds` times in turn (their order alternating), mlflow once
        runs = {}
        for clients in concurrency:
            for rnd in range(rounds):
                pair = [("runtime", runtime_url), ("captured", captured_url)]
                for name, url in [*(pair if rnd % 2 == 0 else pair[::-1]), *([("mlflow", mlflow_invocations)] if rnd == 0 else [])]:
                    say(f"throughput: {name}, {clients} concurrent clients, {warmup_seconds:g} s warm-up + {seconds:g} s"
                        f"{f' (round {rnd + 1} of {rounds})' if name != 'mlflow' and rounds > 1 else ''} ...")
                    before = batch_rows(info["url"], endpoint, auth) if name == "runtime" else None
                    r = load(url, clients, servers, "mlflow" if name == "mlflow" else "runtime")  # both endpoints live in the runtime's process
                    if before is not None:
                        after = batch_rows(info["url"], endpoint, auth)
                        calls = after[1] - before[1]
                        r["batch_rows"] = (after[0] - before[0]) / calls if calls else float("nan")  # warm-up included
                    runs.setdefault((name, clients), []).append(r)
        throughput = {k: pooled(rs) for k, rs in runs.items()}
        total_rows, total_calls = batch_rows(info["url"], endpoint, auth)
        from serving_mlops.tables import tables_for
        sent = tallies["runtime with inference table, features in request"].answered + \
            sum(r["tally"].answered for (n, _), r in [*throughput.items(), *baseline_throughput.items()] if n.endswith("captured"))
        latency.update(baseline_latency); tallies.update(baseline_tallies); throughput.update(baseline_throughput)
        payload_table, deadline = inference_table(env, captured), time.monotonic() + 60
        while time.monotonic() < deadline and tables_for(env).count(payload_table) < sent: time.sleep(0.5)
        captured_rows = tables_for(env).count(payload_table)
    finally:
        if mlflow_proc is not None:
            say("stopping mlflow models serve ...")
            stop_process_group(mlflow_proc)
        if echo_proc is not None: stop_process_group(echo_proc)
        os.environ.pop("SERVING_MLOPS_FAST_PATH", None)
        if runtime_started:
            say("stopping the runtime ...")
            stop_server(env)
        home = Path(env.root).parent
        if not keep and home.name.startswith("serving-mlops-") and Path(tempfile.gettempdir()) in home.parents:
            shutil.rmtree(home, ignore_errors=True)
        elif keep: say(f"workspace kept at {home}")

    # --- results ---
    print(f"\n{len(ids)} customers cycling, one row per request, model {uri} (sklearn HistGradientBoosting pipeline, "
          f"{len(columns)} features), mlflow {mlflow.__version__}, {os.cpu_count()} cores shared by client and servers; "
          f"mlflow models serve with {mlflow_workers} uvicorn worker(s); OMP_NUM_THREADS "
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}.\n")
    print("| one-row latency (sequential, keep-alive) | p50 | p99 | errors | mismatches |\n|---|---|---|---|---|")
    for label, us in latency.items():
        p50, p99 = percentiles(us)
        print(f"| {label} | {p50 / 1000:.2f} ms | {p99 / 1000:.2f} ms | {tallies[label].errors} | {tallies[label].mismatches} |")
    print(f"\nCPU during the latency runs (1.0 = one core): client {latency_cpu.client:.2f}, runtime {latency_cpu.server['runtime']:.2f}, "
          f"mlflow serve {latency_cpu.server['mlflow']:.2f}, other processes on the machine {latency_cpu.other:.2f}")
    print(f"\n| throughput, features in request ({seconds:g} s each; the runtime's endpoints {rounds} rounds in turn, pooled; client {client}) | requests/s | p50 | p99 | client CPU | server CPU | server CPU per request | other CPU | rows per model call | errors | mismatches |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, clients), r in throughput.items():
        p50, p99 = percentiles(r["latencies"]) if len(r["latencies"]) > 1 else (float("nan"), float("nan"))
        batch = f"{r['batch_rows']:.2f}" if "batch_rows" in r else "n/a"
        per_request = f"{r['server_cpu'] / r['rps'] * 1000:.1f} ms" if r["rps"] else "n/a"
        print(f"| {LABELS[name]}, {clients} clients | {r['rps']:,.0f} | {p50 / 1000:.2f} ms | "
              f"{p99 / 1000:.2f} ms | {r['client_cpu']:.2f} | {r['server_cpu']:.2f} | {per_request} | {r['other_cpu']:.2f} | {batch} | {r['tally'].errors} | {r['tally'].mismatches} |")
    print(f"\ninference table {payload_table}: {captured_rows:,} rows; {sent:,} answered requests were measured (the table also holds the warm-up requests)")
    print(f"\nserving_model_batch_rows over the whole run: {total_rows:,.0f} rows in {total_calls:,.0f} model calls, "
          f"mean {total_rows / total_calls if total_calls else float('nan'):.2f} rows per call")

    p50 = {label: percentiles(us)[0] / 1000 for label, us in latency.items()}
    ours, keyed, versus = p50["runtime, features in request"], p50["runtime, key only (online lookup)"], p50[VERSUS]
    theirs, inproc = p50["mlflow models serve, features in request"], p50["in-process pyfunc.predict (no HTTP)"]
    c = 8 if 8 in concurrency else concurrency[0]
    ratio_rps = throughput["runtime", c]["rps"] / throughput["mlflow", c]["rps"] if throughput["mlflow", c]["rps"] else float("inf")
    goals = [
        ("runtime p50 / mlflow serve p50", f"{versus / theirs:.2f}", "<= 0.5", versus / theirs <= 0.5),
        (f"runtime throughput / mlflow serve throughput, {c} clients", f"{ratio_rps:.2f}x", ">= 3x", ratio_rps >= 3),
        ("runtime p50 - in-process pyfunc p50", f"{versus - inproc:+.2f} ms", "<= 1 ms", versus - inproc <= 1),
        ("runtime key-only p50 - features p50", f"{keyed - ours:+.2f} ms", "<= 0.3 ms", keyed - ours <= 0.3)]
    capture_p50 = p50["runtime with inference table, features in request"]
    goals += [("inference table p50 - runtime p50", f"{capture_p50 - ours:+.2f} ms", "<= 0.3 ms", capture_p50 - ours <= 0.3),
              ("inference table rows >= answered requests", f"{captured_rows:,} / {sent:,}", "all", captured_rows >= sent)]
    for client in ("", f" ({RAW})"):  # httpx, the client of every other measurement; then the raw client
        floor = p50[f"do-nothing Starlette app (the floor of HTTP){client}"]
        for label in ("runtime, features in request", "runtime, key only (online lookup)"):
            p50_, p99_ = (x / 1000 for x in percentiles(latency[label + client]))
            goals += [(f"{label}{client}: p50 - do-nothing app p50", f"{p50_ - floor:+.2f} ms", "<= 0.5 ms", p50_ - floor <= 0.5),
                      (f"{label}{client}: p99 / p50", f"{p99_ / p50_:.2f}", "<= 2", p99_ <= 2 * p50_)]
    for k in concurrency:
        r = throughput["captured", k]["rps"] / throughput["runtime", k]["rps"] if throughput["runtime", k]["rps"] else float("nan")
        goals.append((f"inference table throughput / runtime throughput, {k} clients", f"{r:.2f}", ">= 0.95", r >= 0.95))
        if ("baseline runtime", k) in throughput and throughput["baseline runtime", k]["rps"]:
            b = throughput["runtime", k]["rps"] / throughput["baseline runtime", k]["rps"]
            goals.append((f"runtime throughput / baseline (FAST_PATH=0), {k} clients", f"{b:.2f}x", ">= 2x" if k == 8 else "(no target)",
                          b >= 2 if k == 8 else None))
    for other in concurrency:
        if other != c:
            r = throughput["runtime", other]["rps"] / throughput["mlflow", other]["rps"] if throughput["mlflow", other]["rps"] else float("inf")
            goals.append((f"runtime throughput / mlflow serve throughput, {other} clients", f"{r:.2f}x", "(no target)", None))
    print("\n| target | measured | goal | result |\n|---|---|---|---|")
    for name, measured, goal, ok in goals:
        print(f"| {name} | {measured} | {goal} | {'—' if ok is None else 'PASS' if ok else 'MISS'} |")
    problems = {label: t for label, t in tallies.items() if t.errors or t.mismatches}
    problems.update({f"{n}, {k} clients": r["tally"] for (n, k), r in throughput.items() if r["tally"].errors or r["tally"].mismatches})
    for label, t in problems.items(): print(f"\n{label}: {t.errors} errors, {t.mismatches} mismatches, e.g. {t.samples}")
    print(f"\nwhole run: {time.perf_counter() - wall_start:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000, help="synthetic clients in the throwaway workspace")
    parser.add_argument("--customers", type=int, default=300, help="distinct customer ids (1..N) the requests cycle through")
    parser.add_argument("--requests", type=int, default=500, help="sequential requests per latency measurement")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up requests before each latency measurement")
    parser.add_argument("--chunk", type=int, default=50, help="latency targets take turns every CHUNK requests")
    parser.add_argument("--seconds", type=float, default=10, help="duration of each throughput measurement")
    parser.add_argument("--warmup-seconds", type=float, default=1, help="warm-up before each throughput measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32], help="concurrent clients (threads)")
    parser.add_argument("--trials", type=int, default=3, help="Optuna trials when training the model")
    parser.add_argument("--payload", choices=["split", "records"], default="split",
                        help="format of the feature requests, sent identically to both servers: dataframe_split or dataframe_records")
    parser.add_argument("--mlflow-workers", type=int, default=1, help="uvicorn workers of mlflow models serve (its default is 1)")
    parser.add_argument("--omp-threads", type=int, default=None,
                        help="set OMP_NUM_THREADS for this process and both servers (diagnostic; default: leave it unset)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the runs of today's path (the runtime with SERVING_MLOPS_FAST_PATH=0) before the main ones")
    parser.add_argument("--rounds", type=int, default=3,
                        help="throughput: run the runtime's endpoints without and with an inference table this many times in turn (figures pooled)")
    parser.add_argument("--client", choices=["httpx", "light"], default="httpx",
                        help="throughput load generator for the runtime: httpx threads, or the light asyncio client of serving_workers.py "
                             "(raw HTTP/1.1; leaves more of the 2 cores to the server); mlflow serve always gets httpx")
    parser.add_argument("--keep", action="store_true", help="keep the throwaway workspace (logs, request logs) for inspection")
    args = parser.parse_args()
    sys.exit(main(args.rows, args.customers, args.requests, args.warmup, args.chunk, args.seconds, args.warmup_seconds,
                  args.trials, args.concurrency, args.payload, args.mlflow_workers, args.omp_threads, args.keep, args.baseline,
                  args.rounds, args.client))
