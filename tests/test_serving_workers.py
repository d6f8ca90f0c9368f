"""`serving-mlops serve --workers 2`: two processes on one port (SO_REUSEPORT), driven over HTTP and through databricks-sdk.

The module's runtime is the shared served workspace started with two workers. Some tests of the single-process runtime
run here unchanged (imported from test_serving: pytest runs them with this module's fixture). The others check what is
particular to several workers: every worker answers, endpoints and updates made through one worker are what the others
serve and answer, the metrics export sums every worker's requests, capture loses nothing acknowledged when every process
is killed, a killed worker comes back (later each time it dies again soon), and stopping removes every process and
server.json.
"""
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from databricks.sdk.service.serving import AiGatewayConfig, AiGatewayInferenceTableConfig
from prometheus_client.parser import text_string_to_metric_families

from serving_mlops.config import process_alive
from serving_mlops.serving.services import server_file, server_info, stop_server, wait_exit
from serving_mlops.tables import tables_for

from served import MetricReadings, ServedWorkspace, create, entity, in_process, invoke, key, update
from test_serving import (test_a_saved_config_whose_model_version_is_gone_is_not_ready_and_says_why,  # noqa: F401
                          test_a_second_update_is_refused_and_a_failed_update_keeps_serving_the_old_config,
                          test_config_update_under_load_fails_no_request, test_control_plane_create_get_list_update_delete)


@pytest.fixture(scope="module")
def ws(trained_world):
    "The trained world served by two worker processes."
    served = ServedWorkspace(trained_world, workers=2)
    yield served
    served.close()


@pytest.fixture(autouse=True)
def running(ws):
    "The runtime runs before each test, whatever ran before (a test that stops it does not start it again for the next)."
    if server_info(ws.env) is None: ws.start()


def fresh(ws, method: str, path: str, **kw) -> tuple[httpx.Response, int]:
    "One request on a new connection (the kernel picks a worker per connection), and the pid of the worker that answered it."
    with httpx.Client(headers={"Authorization": f"Bearer {ws.token}"}, timeout=60) as c:
        r = c.request(method, ws.url + path, **kw)
        return r, c.get(ws.url + "/health").json()["pid"]  # the same connection: the same worker


def test_an_endpoint_gets_ready_while_only_one_worker_is_asked(ws):
    "The other worker gets no request: it follows the saved state by itself, loads the config, and the endpoint is committed."
    body = {"name": "quiet", "config": {"served_entities": [{"entity_name": ws.env.var("model_name"), "entity_version": ws.v1}]}}
    with httpx.Client(headers={"Authorization": f"Bearer {ws.token}"}, timeout=60) as c:  # one keep-alive connection: one worker
        asker = c.get(ws.url + "/health").json()["pid"]
        assert c.post(ws.url + "/api/2.0/serving-endpoints", json=body).status_code == 200
        deadline = time.monotonic() + 60
        while (state := c.get(ws.url + "/api/2.0/serving-endpoints/quiet").json()["state"])["config_update"] == "IN_PROGRESS":
            assert time.monotonic() < deadline, "the endpoint stayed IN_PROGRESS: the worker that was not asked never loaded it"
            time.sleep(0.2)
        assert state == {"ready": "READY", "config_update": "NOT_UPDATING"} and c.get(ws.url + "/health").json()["pid"] == asker
    ws.w.serving_endpoints.delete("quiet")


def test_every_worker_serves_what_one_created_updated_and_deleted_and_metrics_sum_over_them(ws):
    env, w, name = ws.env, ws.w, "shared"
    workers = server_info(env)["workers"]
    assert len(workers) == 2 and all(process_alive(p) for p in workers)
    create(ws, name, entity(ws, ws.v1))  # one control-plane call (and its GETs) on one worker
    served, sent = {}, 0
    with MetricReadings(ws, name) as metrics:
        for k in range(60):
            cid = 1 + k % 40
            r, pid = fresh(ws, "POST", f"/serving-endpoints/{name}/invocations", json={"dataframe_records": [ws.features(cid)]})
            assert r.status_code == 200, r.text
            assert abs(r.json()["predictions"][0] - float(in_process(ws, [ws.features(cid)])[0])) < 1e-9
            served.setdefault(pid, 0); served[pid] += 1; sent += 1
    assert set(served) == set(workers), served  # both workers answered
    version = f"default_model-{ws.v1}"
    assert metrics.total(version) == sent and metrics.total(version, "latency_count") == sent  # every worker's requests, summed
    text = w.serving_endpoints.export_metrics(name).contents.read().decode()
    rows = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("serving_model_batch_rows") and "le" not in s.labels}
    assert rows["serving_model_batch_rows_sum"] == sent  # one row per request, over both workers

    # an update made through one worker: GET answers the same from every worker, and every worker serves the new version
    update(w, name, served_entities=[entity(ws, ws.v2)])
    seen = {}
    for _ in range(30):
        r, pid = fresh(ws, "GET", f"/api/2.0/serving-endpoints/{name}")
        j = r.json()
        seen[pid] = (j["state"]["ready"], j["state"]["config_update"], j["config"]["config_version"], j["config"]["served_entities"][0]["entity_version"])
        r, pid = fresh(ws, "POST", f"/serving-endpoints/{name}/invocations", json={"dataframe_records": [key(3)]})
        assert r.status_code == 200 and r.headers["served-model-name"] == f"default_model-{ws.v2}", (pid, r.text)
    assert set(seen) == set(workers) and set(seen.values()) == {("READY", "NOT_UPDATING", 2, ws.v2)}, seen
    listed = {fresh(ws, "GET", "/api/2.0/serving-endpoints")[1] for _ in range(20)}
    assert listed == set(workers)

    w.serving_endpoints.delete(name)
    gone = {}
    for _ in range(20):
        r, pid = fresh(ws, "POST", f"/serving-endpoints/{name}/invocations", json={"dataframe_records": [key(3)]})
        gone[pid] = r.status_code
    assert set(gone) == set(workers) and set(gone.values()) == {404}


def test_capture_loses_no_acknowledged_request_when_every_process_is_killed(ws):
    env = ws.env
    gateway = AiGatewayConfig(inference_table_config=AiGatewayInferenceTableConfig(
        catalog_name="dev", schema_name="credit", table_name_prefix="workers", enabled=True))
    create(ws, "captured2", entity(ws, ws.v1), ai_gateway=gateway)
    stop, acked, lock = threading.Event(), {}, threading.Lock()
    def client_loop(k):
        i = 0
        while not stop.is_set():
            with httpx.Client() as client:  # new connections: both workers capture
                for _ in range(20):
                    try: r = invoke(ws, "captured2", {"dataframe_records": [key(1 + (i + k) % 300)]}, client)
                    except httpx.TransportError: return  # never acknowledged
                    if r.status_code == 200:
                        with lock: acked[r.headers["x-request-id"]] = r.json()["predictions"][0]
                    i += 1
    info = server_info(env)
    with ThreadPoolExecutor(4) as pool:
        loops = [pool.submit(client_loop, k) for k in range(4)]
        time.sleep(3)
        for pid in [info["pid"], *info["workers"]]: os.kill(pid, signal.SIGKILL)
        time.sleep(0.5); stop.set()
        for f in loops: f.result()
    assert all(wait_exit(p, 30) for p in [info["pid"], *info["workers"]]) and len(acked) > 100
    assert {p.name for p in env.path("serving", "inference").iterdir()} >= {"captured2", "captured2@1"}  # one log per worker
    ws.start()  # each worker replays its own log
    table, deadline = "dev.credit.workers_payload", time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = tables_for(env).read_pandas(table)
        if set(acked) <= set(rows.databricks_request_id): break
        time.sleep(0.5)
    assert not set(acked) - set(rows.databricks_request_id), "acknowledged requests missing from the inference table"
    assert rows.databricks_request_id.is_unique
    ws.w.serving_endpoints.delete("captured2")


def test_a_killed_worker_comes_back_later_each_time_it_dies_again(ws):
    env = ws.env
    log_path = server_file(env).with_suffix(".log")
    before, delays = log_path.read_text(errors="replace"), []
    for _ in range(2):  # the second death comes within STABLE_SECONDS of the restart: it waits twice as long
        info = server_info(env)
        old = info["workers"][0]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and old in (server_info(env) or {"workers": [old]})["workers"]: time.sleep(0.1)
        workers = server_info(env)["workers"]
        assert old not in workers and len(workers) == 2 and all(process_alive(p) for p in workers), workers
        text = log_path.read_text(errors="replace")[len(before):]
        found = re.findall(rf"worker 0 \(pid {old}\) of the serving runtime exited with status -9 after [0-9.]+ s; starting it again in ([0-9.]+) s", text)
        assert len(found) == 1, text[-2000:]
        delays.append(float(found[0]))
    assert delays[1] == 2 * delays[0], delays
    deadline, answered = time.monotonic() + 60, set()
    while time.monotonic() < deadline and answered != set(workers):  # the new worker listens once it restored every endpoint
        answered.add(fresh(ws, "GET", "/api/2.0/serving-endpoints")[1])
    assert answered == set(workers), (answered, workers)


def test_stop_ends_every_worker_and_removes_server_json(ws):
    env = ws.env
    info = server_info(env)
    pids = [info["pid"], *info["workers"]]
    assert stop_server(env)
    assert not any(process_alive(p) for p in pids) and not server_file(env).exists()
    assert not any(p.suffix == ".json" for p in env.path("serving", "workers").iterdir())  # the workers' files went with them
    assert stop_server(env) is False
