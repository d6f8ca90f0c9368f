"""The serving runtime as a separate process on 127.0.0.1, driven only through databricks-sdk and HTTP.

One workspace for the module: synthetic clients, feature tables published online, two trained versions of the
credit model and a small pyfunc model that raises on negative input (to see a model exception answered, not a crash).
The runtime's metrics export gives per-interval values as Databricks' does per minute; the module's runtime uses
1-second intervals (`--metrics-interval 1`) so that the tests of the per-minute semantics and the canary run in seconds.
"""
import dataclasses
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import mlflow
import numpy as np
import orjson
import pandas as pd
import pytest
from databricks.sdk.errors import (InvalidParameterValue, NotFound, PermissionDenied, ResourceAlreadyExists,
                                   ResourceConflict)
from databricks.sdk.service.serving import (AiGatewayConfig, AiGatewayInferenceTableConfig, Route,
                                            ServedEntityInput, TrafficConfig)
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import binomtest

from conftest import cli
from serving_mlops.config import get_environment
from serving_mlops.serving.services import server_file, server_info, stop_server, wait_exit
from serving_mlops.monitoring.inference import inference_frame, served_entities
from serving_mlops.serving.capture import PAYLOAD_SCHEMA, SERVED_ENTITIES_TABLE
from serving_mlops.serving.request_log import read_request_log
from serving_mlops.tables import tables_for
from serving_mlops.train import model_example, model_signature, training_set

from served import WAIT, SNAPSHOT_DATE, MetricReadings, SlowClassifier, SlowToLoad, create, entity, in_process, invoke, key, update  # noqa: E402
from serving_mlops.deploy import wait_not_updating  # noqa: E402



def test_control_plane_create_get_list_update_delete(ws):
    w, name = ws.w, "crud"
    ep = create(ws, name, entity(ws, ws.v1), tags=None)
    assert (ep.state.ready.value, ep.state.config_update.value) == ("READY", "NOT_UPDATING")
    assert ep.config.served_entities[0].entity_version == ws.v1 and ep.config.config_version == 1
    assert ep.config.traffic_config.routes[0].traffic_percentage == 100
    assert name in [e.name for e in w.serving_endpoints.list()]
    with pytest.raises(ResourceAlreadyExists, match="already exists"):
        create(ws, name, entity(ws, ws.v1))
    with pytest.raises(InvalidParameterValue, match="add up to 110%"):
        w.serving_endpoints.update_config(name, served_entities=[entity(ws, ws.v1, "a"), entity(ws, ws.v2, "b")],
                                          traffic_config=TrafficConfig(routes=[Route(90, served_entity_name="a"), Route(20, served_entity_name="b")]))
    # the SDK's own waiter reads the runtime's states (the rest of the suite polls faster: `wait_not_updating`)
    ep = w.serving_endpoints.update_config_and_wait(name, served_entities=[entity(ws, ws.v2)])
    assert ep.config.served_entities[0].entity_version == ws.v2 and ep.config.config_version == 2 and ep.pending_config is None
    gateway = w.serving_endpoints.put_ai_gateway(name, inference_table_config=AiGatewayInferenceTableConfig(
        catalog_name="dev", schema_name="credit", table_name_prefix="crud", enabled=True))
    assert gateway.inference_table_config.table_name_prefix == "crud"
    assert w.serving_endpoints.get(name).ai_gateway.inference_table_config.enabled
    w.serving_endpoints.delete(name)
    with pytest.raises(NotFound, match="'crud' does not exist"):
        w.serving_endpoints.get(name)
    assert name not in [e.name for e in w.serving_endpoints.list()]


def test_invocations_in_all_four_formats_match_in_process_predictions(ws):
    create(ws, "formats", entity(ws, ws.v1))
    rows = [ws.features(cid) for cid in (1, 2, 3)]  # keys and features
    cols = list(rows[0])
    expected = in_process(ws, rows)
    payloads = {"dataframe_split": {"columns": cols, "data": [[r[c] for c in cols] for r in rows]},
                "dataframe_records": rows,
                "instances": rows,
                "inputs": {c: [r[c] for r in rows] for c in cols}}
    for form, data in payloads.items():
        r = invoke(ws, "formats", {form: data})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["predictions"], expected, rtol=0, atol=1e-12, err_msg=form)
        assert r.headers["served-model-name"] == f"default_model-{ws.v1}"
    # rows of bare values carry no column names: MLflow's scoring server refuses them for a model whose signature names its columns
    tensor = invoke(ws, "formats", {"instances": [[r[c] for c in ws.columns] for r in rows]})
    assert tensor.status_code == 400 and "missing inputs" in tensor.json()["message"] and "snapshot_date" in tensor.json()["message"], tensor.text
    q = ws.w.serving_endpoints.query("formats", dataframe_records=rows)  # the SDK's own parsing of the response
    np.testing.assert_allclose(q.predictions, expected, atol=1e-12)
    assert q.served_model_name == f"default_model-{ws.v1}"


def test_key_only_requests_look_features_up_and_request_values_override(ws):
    create(ws, "keys", entity(ws, ws.v1))
    rows = [ws.features(cid) for cid in (5, 6)]
    r = invoke(ws, "keys", {"dataframe_records": [key(5), key(6)]})
    assert r.status_code == 200 and "metadata" not in r.json()
    np.testing.assert_allclose(r.json()["predictions"], in_process(ws, rows), atol=1e-12)
    override = {**rows[0], "limit_balance": 1_000_000.0, "recent_delay": 4.0}
    r = invoke(ws, "keys", {"dataframe_records": [key(5, limit_balance=1_000_000.0, recent_delay=4)]})
    np.testing.assert_allclose(r.json()["predictions"], in_process(ws, [override]), atol=1e-12)
    r = invoke(ws, "keys", {"dataframe_records": [key(987654321)]})
    assert r.status_code == 200
    missing = r.json()["metadata"]["keys_not_found"]
    assert {m["table"] for m in missing} == {"dev.credit.behaviour_features", "dev.credit.demographic_features"}
    assert all(m["key"] == [987654321] for m in missing)
    nan_row = pd.DataFrame([[np.nan] * len(ws.columns)], columns=ws.columns).assign(**key(987654321))
    np.testing.assert_allclose(r.json()["predictions"], ws.model.predict(nan_row), atol=1e-12)  # imputed like the pipeline does


def test_traffic_split_90_10(ws):
    create(ws, "split", entity(ws, ws.v1, "old"), entity(ws, ws.v2, "new"),
           routes=[Route(90, served_entity_name="old"), Route(10, served_entity_name="new")])
    n, served = 1_000, []
    with MetricReadings(ws, "split") as metrics, httpx.Client() as client:
        for i in range(n):
            r = invoke(ws, "split", {"dataframe_records": [key(1 + i % 50)]}, client)
            assert r.status_code == 200
            served.append(r.headers["served-model-name"])
    new = served.count("new")
    assert served.count("old") + new == n
    assert binomtest(new, n, 0.10).pvalue > 1e-4, f"{new} of {n} requests went to the 10% entity"
    # Databricks' names, per interval (not counters): the intervals' values add up to the requests, each interval read once
    assert {e: metrics.total(e) for e in ("old", "new")} == {"old": n - new, "new": new}
    assert {e: metrics.total(e, "latency_count") for e in ("old", "new")} == {"old": n - new, "new": new}
    assert len(metrics.readings["old"]) >= 2  # the requests spread over several intervals
    families = {f.name: f for f in text_string_to_metric_families(ws.w.serving_endpoints.export_metrics("split").contents.read().decode())}
    assert {"request_count_total", "request_4xx_count_total", "request_5xx_count_total", "request_latency_ms", "cpu_usage_percentage",
            "mem_usage_percentage", "provisioned_concurrent_requests_total"} <= set(families)
    assert {(f, s.labels["served_model_name"]) for f in ("request_count_total", "provisioned_concurrent_requests_total")
            for s in families[f].samples} == {(f, e) for f in ("request_count_total", "provisioned_concurrent_requests_total") for e in ("old", "new")}
    assert all(s.value == 0 for s in families["request_count_total"].samples)  # the last complete interval had no requests
    assert all(s.timestamp is not None for s in families["request_count_total"].samples)  # stamped with the interval's end
    assert {s.value for s in families["provisioned_concurrent_requests_total"].samples} == {4.0}  # Small: 4


def test_auth_failures_never_reach_a_model(ws):
    env = ws.env
    create(ws, "auth", entity(ws, ws.v1))
    ok = {"dataframe_records": [key(1)]}
    r = httpx.post(f"{ws.url}/serving-endpoints/auth/invocations", json=ok)
    assert (r.status_code, r.json()["error_code"]) == (401, "UNAUTHENTICATED")
    r = invoke(ws, "auth", ok, token="dapi" + "0" * 32)
    assert (r.status_code, r.json()["error_code"]) == (403, "PERMISSION_DENIED")
    r = httpx.get(f"{ws.url}/api/2.0/serving-endpoints", headers={"Authorization": "Basic abc"})
    assert r.status_code == 403
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.config import Config
    stranger = WorkspaceClient(config=Config(host=ws.url, token="dapi-wrong", auth_type="pat", retry_timeout_seconds=5))
    with pytest.raises(PermissionDenied):
        list(stranger.serving_endpoints.list())
    assert not (env.root / "serving" / "requests" / "auth.jsonl").exists()  # nothing reached a model: no outcome was recorded
    token_file = env.root / "tokens" / "serving-token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert invoke(ws, "auth", ok).status_code == 200
    assert ws.token not in (env.root / "serving" / "server.log").read_text()


BAD_INPUTS = [
    (b"{not json", "not valid JSON"),
    (b'{"dataframe_records": [{"customer_id": NaN}]}', "NaN and Infinity are not JSON"),
    (b'{"inputs": {"age": [1e999]}}', "number is infinity"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", "exactly one of"),
    (b'{"instances": [[1]], "inputs": {"age": [1]}}', "it has instances, inputs"),
    (b'{"dataframe_records": [{"age": 30}]}', "missing column(s)"),
    (b'{"dataframe_records": [{"customer_id": 1, "colour": 3}]}', "unknown column(s) ['colour']"),
    (b'{"dataframe_records": [{"customer_id": 1, "age": "thirty"}]}', "column 'age' row 0: expected a number or null, got string"),
    (b'{"dataframe_records": [{"customer_id": 1, "age": [30]}]}', "column 'age' row 0: expected a number or null, got array"),
    (b'{"dataframe_records": [{"customer_id": null}]}', "key column 'customer_id' row 0"),
    (b'{"dataframe_split": {"columns": ["customer_id"], "data": [[1, 2]]}}', "dataframe_split.data[0] has 2 values; expected 1"),
    (b'{"instances": [[1, 2, 3]]}', "instances[0] has 3 values; the model takes 18"),
    (b'{"inputs": {"customer_id": [1, 2], "age": [3]}}', "different lengths"),
    (b'{"dataframe_records": 5}', "must be an array of rows"),
    (b'{"dataframe_records": []}', "has no rows"),
    (b'{"dataframe_records": [{"customer_id": 1}], "params": [1]}', "params must be an object"),
    (b'{"dataframe_records": [{"customer_id": 1}], "temperature": 0.5}', "unknown request field(s) ['temperature']"),
]


def test_a_csv_body_gets_the_answer_mlflows_scoring_server_gives(ws):
    """Issue 31: `text/csv` invocations, as `mlflow models serve` takes them: read by MLflow's own `parse_csv_input` with the
    signature's column types, compared with MLflow's scoring server in process on the same bodies (status, error code,
    predictions). MLflow 3 refuses CSV for a model with a datetime input (pandas cannot parse to the datetime64 type it asks
    for), so the feature-store model takes JSON only, from us as from MLflow."""
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient
    create(ws, "csv-x", ServedEntityInput(entity_name="dev.credit.exploding_model", entity_version="1"))
    create(ws, "csv-fs", entity(ws, ws.v1))
    ws.world.use_mlflow()
    cases = {"csv-x": ("models:/dev.credit.exploding_model/1", ["x\n1.5\n2\n", "x\n-1\n", "x\nnot a number\n", "y\n1.0\n"]),
             "csv-fs": (f"models:/{ws.env.model_name}/{ws.v1}", [pd.DataFrame([key(1), key(2)]).to_csv(index=False)])}
    for name, (uri, bodies) in cases.items():
        with TestClient(scoring_server.init(mlflow.pyfunc.load_model(uri))) as mlflow_server:
            for body in bodies:
                theirs = mlflow_server.post("/invocations", content=body, headers={"Content-Type": "text/csv"})
                ours = httpx.post(f"{ws.url}/serving-endpoints/{name}/invocations", content=body, timeout=30,
                                  headers={"Content-Type": "text/csv", "Authorization": f"Bearer {ws.token}"})
                assert ours.status_code == theirs.status_code, (name, body, ours.text, theirs.text)
                if theirs.status_code == 200: assert ours.json()["predictions"] == theirs.json()["predictions"], (body, ours.text)
                elif not body.startswith("y"): assert ours.json()["error_code"] == theirs.json()["error_code"], (body, ours.text, theirs.text)
                else: assert "unknown column(s) ['y']" in ours.json()["message"]  # the deviation table's first row (docs/serving.md): named before MLflow is asked
    assert invoke(ws, "csv-x", {"dataframe_split": {"columns": ["x"], "data": [[1.5]]}}).json()["predictions"] == [{"x": 3.0}]  # JSON too
    for name in cases: ws.w.serving_endpoints.delete(name)


def test_bad_input_gets_400_naming_the_problem_and_the_server_keeps_serving(ws):
    create(ws, "bad", entity(ws, ws.v1))
    create(ws, "exploding", ServedEntityInput(entity_name="dev.credit.exploding_model", entity_version="1"))
    with MetricReadings(ws, "bad") as metrics, httpx.Client() as client:
        for body, message in BAD_INPUTS:
            r = invoke(ws, "bad", body, client)
            assert r.status_code == 400, (body, r.status_code, r.text)
            # a required input missing is refused as MLflow's enforcement refuses it ("Model is missing inputs")
            code = "INVALID_PARAMETER_VALUE" if message == "missing column(s)" else "BAD_REQUEST"
            assert r.json()["error_code"] == code and message in r.json()["message"], (body, r.json())
        huge = {"inputs": {"customer_id": list(range(10_001)), "snapshot_date": [SNAPSHOT_DATE] * 10_001}}
        r = invoke(ws, "bad", huge, client)
        assert r.status_code == 400 and "10001 rows" in r.json()["message"]
        r = invoke(ws, "nowhere", {"dataframe_records": [key(1)]}, client)
        assert (r.status_code, r.json()["error_code"]) == (404, "RESOURCE_DOES_NOT_EXIST")
        r = invoke(ws, "bad", b'{"inputs": {"customer_id": [' + b"1," * (8 * 2**20) + b"1]}}", client)
        assert r.status_code == 413 and "limit" in r.json()["message"]
        assert invoke(ws, "bad", {"dataframe_records": [key(1)]}, client).status_code == 200
    r = invoke(ws, "exploding", {"dataframe_records": [{"x": -1.0}]})
    assert r.status_code == 400 and "failed on this input: ValueError: x must be non-negative" in r.json()["message"]
    assert invoke(ws, "exploding", {"dataframe_records": [{"x": 1.5}]}).json()["predictions"] == [{"x": 3.0}]  # its series, as MLflow answers it
    assert invoke(ws, "bad", {"dataframe_records": [key(1)]}).status_code == 200  # still serving
    assert server_info(ws.env) is not None
    served = f"default_model-{ws.v1}"
    # each bad body once (+ the huge batch) is a 4xx; 404 and 413 never reached the endpoint; one request succeeded
    assert (metrics.total(served, "errors"), metrics.total(served)) == (len(BAD_INPUTS) + 1, len(BAD_INPUTS) + 2)
    outcomes = read_request_log(ws.env.root / "serving" / "requests", "bad")
    assert len(outcomes) == len(BAD_INPUTS) + 3 and sum(o["status_code"] == 200 for o in outcomes) == 2


def test_config_update_under_load_fails_no_request(ws):
    w = ws.w
    create(ws, "live", entity(ws, ws.v1))
    stop, results = threading.Event(), []
    def client_loop(k):
        with httpx.Client() as client:
            i = 0
            while not stop.is_set():
                r = invoke(ws, "live", {"dataframe_records": [key(1 + (i + k) % 40)]}, client)
                results.append((r.status_code, r.headers.get("served-model-name")))
                i += 1
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client_loop, k) for k in range(4)]
        time.sleep(1)
        update(w, "live", served_entities=[entity(ws, ws.v2)])
        time.sleep(1)
        update(w, "live", served_entities=[entity(ws, ws.v1)])
        time.sleep(1)
        stop.set()
        for f in futures: f.result()
    statuses = [s for s, _ in results]
    assert len(statuses) > 50 and set(statuses) == {200}, f"{len([s for s in statuses if s != 200])} failed"
    served = [m for _, m in results]
    assert f"default_model-{ws.v2}" in served and served[-1] == f"default_model-{ws.v1}"


def test_a_saved_config_whose_model_version_is_gone_is_not_ready_and_says_why(ws):
    "Issue 28 item 4: a config restored after a restart that cannot load is NOT_READY / UPDATE_FAILED with the reason, from one process and from every worker."
    create(ws, "gone", entity(ws, ws.v1))
    path = ws.env.path("serving", "endpoints") / "gone.json"
    assert stop_server(ws.env)
    record = orjson.loads(path.read_bytes())
    record["config"]["served_entities"][0]["entity_version"] = "99"  # a version the registry does not have
    path.write_bytes(orjson.dumps(record))
    ws.start()
    url, headers = f"{ws.url}/api/2.0/serving-endpoints/gone", {"Authorization": f"Bearer {ws.token}"}
    deadline = time.monotonic() + 60
    while httpx.get(url, headers=headers).json()["state"]["config_update"] == "IN_PROGRESS":
        assert time.monotonic() < deadline, "the endpoint stayed IN_PROGRESS"
        time.sleep(0.2)
    time.sleep(0.5)  # every worker has followed the one that failed
    for _ in range(8):  # a new connection each: with several workers, the kernel picks one for each
        j = httpx.get(url, headers=headers).json()
        assert j["state"] == {"ready": "NOT_READY", "config_update": "UPDATE_FAILED"}, j
        message = j["pending_config"]["served_entities"][0]["state"]["deployment_state_message"]
        assert "99" in message, message
        r = invoke(ws, "gone", {"dataframe_records": [key(1)]})
        assert r.status_code == 400 and "is not ready: " in r.json()["message"] and "99" in r.json()["message"], r.text
    ws.w.serving_endpoints.delete("gone")


def test_a_version_whose_online_table_lacks_a_feature_does_not_load_and_a_column_gone_later_is_a_400(ws, tmp_path):
    "Issue 29 item 6: a feature the online table does not have fails the load (the endpoint keeps what it served); a column gone after the load is a 400 naming it, never a 500."
    from serving_mlops.feature_store import OnlineStore, latest_per_key
    from serving_mlops.serving.models import ServedModel
    from serving_mlops.serving.protocol import ServingError
    ws.world.use_mlflow()
    tables, online = tables_for(ws.env), OnlineStore(tmp_path / "online_store.db")
    latest = {t: latest_per_key(tables.read_arrow(t), ["customer_id"], "snapshot_date")
              for t in (ws.env.table_name("behaviour_features"), ws.env.table_name("demographic_features"))}
    demographic = ws.env.table_name("demographic_features")
    for t, rows in latest.items(): online.publish(t, rows.drop(["age"]) if t == demographic else rows, ["customer_id"], 1)
    entity = {"name": "lacking", "entity_name": ws.env.var("model_name"), "entity_version": ws.v1}
    with pytest.raises(ValueError, match=rf"looks up \['age'\] in the online table {demographic}, which has no such column"):
        ServedModel(entity, online=online, env=ws.env)
    online.publish(demographic, latest[demographic], ["customer_id"], 2)
    model = ServedModel(entity, online=online, env=ws.env)
    request = model.parse(orjson.dumps({"dataframe_records": [key(1)]}))
    assert len(model.features(request)[0]) == 1
    online.publish(demographic, latest[demographic].drop(["age"]), ["customer_id"], 3)  # republished without it, while serving
    with pytest.raises(ServingError, match=r"served entity 'lacking' .* looks up \['age'\] in the online table .*, which no longer has"):
        model.features(request)
    model.close()


def test_deploy_checks_the_online_tables_before_it_touches_the_endpoint(ws):
    "Issue 29 item 2: a version whose online table lacks a feature it looks up is refused by deploy, naming table and column, and the endpoint is not changed."
    from serving_mlops.deploy import DeploymentFailed, deploy
    from serving_mlops.feature_store import OnlineStore, latest_per_key
    ws.world.use_mlflow()
    demographic = ws.env.table_name("demographic_features")
    online = OnlineStore(ws.env.path("online", "online_store.db"))  # the runtime's own online store
    rows, version = latest_per_key(tables_for(ws.env).read_arrow(demographic), ["customer_id"], "snapshot_date"), online.published(demographic)["delta_version"]
    create(ws, "needs", entity(ws, ws.v1))
    before = ws.w.serving_endpoints.get("needs")
    online.publish(demographic, rows.drop(["age"]), ["customer_id"], version + 1000)  # published again without a feature the model looks up
    try:
        with pytest.raises(DeploymentFailed, match=rf"version {ws.v2} of .* endpoint needs was not changed: .* looks up \['age'\] in the online table "
                                                   rf"{demographic}, which has no such column; publish it"):
            deploy(ws.env, ws.v2, endpoint="needs", client=ws.w)
        after = ws.w.serving_endpoints.get("needs")
        assert after.pending_config is None and after.config.config_version == before.config.config_version
        assert after.config.served_entities[0].entity_version == ws.v1
    finally: online.publish(demographic, rows, ["customer_id"], version + 1001)
    assert invoke(ws, "needs", {"dataframe_records": [key(1)]}).status_code == 200
    ws.w.serving_endpoints.delete("needs")


def test_a_second_update_is_refused_and_a_failed_update_keeps_serving_the_old_config(ws):
    w = ws.w
    create(ws, "sturdy", entity(ws, ws.v1))
    w.serving_endpoints.update_config("sturdy", served_entities=[entity(ws, ws.v2)])  # loading takes a while
    with pytest.raises(ResourceConflict, match="config update in progress"):
        w.serving_endpoints.update_config("sturdy", served_entities=[entity(ws, ws.v1)])
    ep = wait_not_updating(w, "sturdy", WAIT)
    assert ep.config.served_entities[0].entity_version == ws.v2
    w.serving_endpoints.update_config("sturdy", served_entities=[entity(ws, "999")])
    deadline = time.monotonic() + 60
    while (ep := w.serving_endpoints.get("sturdy")).state.config_update.value == "IN_PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (ep.state.ready.value, ep.state.config_update.value) == ("READY", "UPDATE_FAILED")
    failed = ep.pending_config.served_entities[0]
    assert failed.state.deployment.value == "DEPLOYMENT_FAILED" and "cannot load models:/dev.credit.default_model/999" in failed.state.deployment_state_message
    assert ep.config.served_entities[0].entity_version == ws.v2
    r = invoke(ws, "sturdy", {"dataframe_records": [key(1)]})
    assert r.status_code == 200 and r.headers["served-model-name"] == f"default_model-{ws.v2}"
    ep = update(w, "sturdy", served_entities=[entity(ws, ws.v1)])  # a failed update does not block the next
    assert ep.state.config_update.value == "NOT_UPDATING" and ep.config.served_entities[0].entity_version == ws.v1


def test_sigterm_finishes_requests_in_flight_and_a_restart_restores_every_endpoint(ws):
    env, w = ws.env, ws.w
    create(ws, "durable", entity(ws, ws.v1, "one"), entity(ws, ws.v2, "two"),
           routes=[Route(50, served_entity_name="one"), Route(50, served_entity_name="two")])
    before = {e.name for e in w.serving_endpoints.list()}
    big = {"inputs": {"customer_id": [1 + i % 500 for i in range(5_000)], "snapshot_date": [SNAPSHOT_DATE] * 5_000}}
    pid = server_info(env)["pid"]
    clients, killed = [httpx.Client(timeout=120) for _ in range(3)], False
    try:
        for c in clients: assert c.get(f"{ws.url}/health").status_code == 200  # each connection accepted and served: the server's
        with ThreadPoolExecutor(3) as pool:  # (a fixed sleep after starting the threads lost the race on a loaded machine: the
            futures = [pool.submit(invoke, ws, "durable", big, c) for c in clients]  # connections came after the stop, refused)
            time.sleep(0.5)  # the requests are in the server
            os.kill(pid, signal.SIGTERM); killed = True
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert all(len(r.json()["predictions"]) == 5_000 for r in responses)
        assert wait_exit(pid, 60) and not server_file(env).exists()
    finally:
        for c in clients: c.close()
        if killed: wait_exit(pid, 60)
        if server_info(env) is None: ws.start()  # the module's later tests need the runtime, whatever happened here
    w = ws.w
    assert {e.name for e in w.serving_endpoints.list()} == before
    ep = wait_not_updating(w, "durable", WAIT)
    assert ep.state.ready.value == "READY" and [r.traffic_percentage for r in ep.config.traffic_config.routes] == [50, 50]
    r = invoke(ws, "durable", {"dataframe_records": [key(7)]})
    assert r.status_code == 200 and r.headers["served-model-name"] in ("one", "two")


def test_inference_table_has_every_acknowledged_request_exactly_once_after_sigkill(ws):
    env = ws.env
    gateway = AiGatewayConfig(inference_table_config=AiGatewayInferenceTableConfig(
        catalog_name="dev", schema_name="credit", table_name_prefix="captured", enabled=True))
    create(ws, "captured", entity(ws, ws.v1), ai_gateway=gateway)
    stop, acked, lock = threading.Event(), {}, threading.Lock()
    def client_loop(k):
        with httpx.Client() as client:
            i = 0
            while not stop.is_set():
                cid = 1 + (i * 7 + k) % 300
                try: r = invoke(ws, "captured", {"dataframe_records": [key(cid)], "client_request_id": f"c{k}-{i}"}, client)
                except httpx.TransportError: return  # the server is gone: this request was never acknowledged
                if r.status_code == 200:
                    with lock: acked[r.headers["x-request-id"]] = (f"c{k}-{i}", cid, r.json()["predictions"][0])
                i += 1
    pid = server_info(env)["pid"]
    with ThreadPoolExecutor(4) as pool:
        loops = [pool.submit(client_loop, k) for k in range(4)]
        time.sleep(3)  # a few flushes (every second) and records in between
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5); stop.set()
        for f in loops: f.result()
    assert wait_exit(pid, 30) and len(acked) > 100
    ws.start()  # replays the log the killed process left
    table, deadline = "dev.credit.captured_payload", time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = tables_for(env).read_pandas(table) if tables_for(env).exists(table) else pd.DataFrame({"databricks_request_id": []})
        if set(acked) <= set(rows.databricks_request_id): break
        time.sleep(0.5)
    missing = set(acked) - set(rows.databricks_request_id)
    assert not missing, f"{len(missing)} acknowledged requests are not in {table}"
    assert rows.databricks_request_id.is_unique, "a request is in the inference table twice"
    assert tables_for(env).schema(table) == PAYLOAD_SCHEMA  # the AI Gateway inference table's columns, exactly
    mine = rows.set_index("databricks_request_id").loc[list(acked)]
    assert (mine.status_code == 200).all() and mine.served_entity_id.nunique() == 1 and (mine.sampling_fraction == 1.0).all()
    assert list(mine.client_request_id) == [c for c, _, _ in acked.values()]
    assert (mine.request_date == mine.request_time.dt.date).all() and all(len(codes) == 0 for codes in mine.logging_error_codes)
    first = next(iter(acked))
    assert orjson.loads(mine.loc[first, "response"])["predictions"] == [acked[first][2]]
    assert orjson.loads(mine.loc[first, "request"])["dataframe_records"] == [key(acked[first][1])]
    # what monitoring makes of the rows: the served entity's version from the history, the features looked up as of the request
    resolved = served_entities(env, "captured", mine.served_entity_id.unique())
    assert resolved[["served_entity_name", "model_name", "model_version"]].values.tolist() == [[f"default_model-{ws.v1}", env.var("model_name"), ws.v1]]
    frame = inference_frame(env, rows.loc[rows.databricks_request_id.isin(list(acked)[:20])], endpoint="captured").set_index("databricks_request_id")
    for rid in frame.index:
        expected = ws.features(acked[rid][1])
        assert [frame.loc[rid, c] for c in ws.columns] == [expected[c] for c in ws.columns]  # the values the model saw online
        assert frame.loc[rid, "prediction"] == acked[rid][2]
    ws.w.serving_endpoints.delete("captured")

def test_every_payload_row_resolves_to_the_version_that_answered_through_the_served_entity_history(ws):
    "Databricks' API does not return served_entity_id: rows resolve through system.serving.served_entities, old configs included."
    env, w, name = ws.env, ws.w, "history"
    gateway = AiGatewayConfig(inference_table_config=AiGatewayInferenceTableConfig(
        catalog_name="dev", schema_name="credit", table_name_prefix="history", enabled=True))
    create(ws, name, entity(ws, ws.v1), ai_gateway=gateway)
    answered = {}
    def send(k):
        for i in range(k):
            r = invoke(ws, name, {"dataframe_records": [key(1 + i)]})
            assert r.status_code == 200
            answered[r.headers["x-request-id"]] = r.headers["served-model-name"]
    send(5)
    one, two = f"default_model-{ws.v1}", f"default_model-{ws.v2}"
    update(w, name, served_entities=[entity(ws, ws.v1), entity(ws, ws.v2)],
           traffic_config=TrafficConfig(routes=[Route(50, served_entity_name=one), Route(50, served_entity_name=two)]))
    send(30)
    ep = update(w, name, served_entities=[entity(ws, ws.v2)])
    send(5)
    assert ep.config.config_version == 3 and {one, two} <= set(answered.values())
    w.serving_endpoints.delete(name)  # flushes the inference log and records the deletion
    rows = tables_for(env).read_pandas("dev.credit.history_payload")
    assert set(rows.databricks_request_id) == set(answered)
    entities = served_entities(env, name, rows.served_entity_id.unique()).set_index("served_entity_id")
    assert len(entities) == 2  # one id per entity: v1 kept its id through the update that added v2, v2 kept its own after
    got = rows.served_entity_id.map(entities.served_entity_name)
    assert dict(zip(rows.databricks_request_id, got)) == answered  # every row names the entity that answered it
    assert rows.served_entity_id.map(entities.model_version).isin([ws.v1, ws.v2]).all()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        history = tables_for(env).read_pandas(SERVED_ENTITIES_TABLE, filters=[("endpoint_name", "=", name)])
        if history.endpoint_delete_time.notna().any(): break
        time.sleep(0.2)
    assert sorted(history.endpoint_config_version.unique()) == [1, 2, 3]
    assert set(history[history.endpoint_delete_time.notna()].served_entity_name) == {two}  # the config the endpoint had when deleted
    assert "served_entity_id" not in orjson.dumps(ep.as_dict()).decode()  # not in the API, as on Databricks


def test_a_deployment_that_times_out_is_rolled_back_and_the_error_names_the_endpoint(ws):
    "databricks-sdk's waiters raise the built-in TimeoutError: deploy_and_test catches it, rolls back and says what timed out."
    from serving_mlops.deploy import DeploymentFailed, deploy_and_test
    env, w = ws.env, ws.w
    mlflow.set_tracking_uri(env.tracking_uri); mlflow.set_registry_uri(env.registry_uri)
    rows = pd.DataFrame([ws.features(cid) for cid in range(1, 4)])
    with mlflow.start_run():
        slow = mlflow.pyfunc.log_model(name="slow_to_load", python_model=SlowToLoad(), registered_model_name=env.var("model_name"),
                                       signature=mlflow.models.infer_signature(rows, np.zeros(len(rows))), pip_requirements=["mlflow"])
    version = str(slow.registered_model_version)
    create(ws, "timeouts", entity(ws, ws.v1))
    with pytest.raises(DeploymentFailed) as failed:
        deploy_and_test(env, version, endpoint="timeouts", timeout_minutes=1 / 30, requests=5)  # 2 s for a 5 s load
    message = str(failed.value)
    assert f"endpoint timeouts: the config update to default_model-{version} 100% was not ready within 0:00:02" in message, message
    assert f"rolled back: restored the previous config: default_model-{ws.v1} 100%" in message, message
    ep = w.serving_endpoints.get("timeouts")
    assert ep.state.config_update.value == "NOT_UPDATING" and [s.entity_version for s in ep.config.served_entities] == [ws.v1]
    assert invoke(ws, "timeouts", {"dataframe_records": [key(1)]}).headers["served-model-name"] == f"default_model-{ws.v1}"
    with pytest.raises(DeploymentFailed) as failed:  # the first-deploy rule: an endpoint still being created is never deleted
        deploy_and_test(env, version, endpoint="timeouts-new", timeout_minutes=1 / 30, requests=5)
    message = str(failed.value)
    assert "endpoint timeouts-new: creating it to" in message, message
    assert "rolled back: left endpoint timeouts-new in place: its first deployment is still in progress" in message, message
    assert w.serving_endpoints.get("timeouts-new").state.config_update.value == "IN_PROGRESS"  # still loading, not deleted
    ready = wait_not_updating(w, "timeouts-new", timedelta(minutes=2))
    assert ready.state.ready.value == "READY" and [s.entity_version for s in ready.config.served_entities] == [version]
    strict = dataclasses.replace(env, variables={**env.variables, "endpoint_latency_budget_ms": 0.001})
    with pytest.raises(DeploymentFailed) as failed:  # an endpoint this deployment created, ready but failing its tests, is left in place too
        deploy_and_test(strict, ws.v1, endpoint="timeouts-created", requests=5)
    assert "rolled back: left endpoint timeouts-created in place: this deployment created it, so it has no earlier config" in str(failed.value), str(failed.value)
    assert w.serving_endpoints.get("timeouts-created").state.ready.value == "READY"  # the job failed; the endpoint is not deleted
    for name in ("timeouts", "timeouts-new", "timeouts-created"): w.serving_endpoints.delete(name)


def test_cli_serve_background_endpoints_and_stop(home):
    env = get_environment("staging")
    out = cli("serve", "--env", "staging", "--background", "--port", "0", process=True).stdout
    info = server_info(env)
    assert info is not None and info["url"] in out and "serving-token" in out
    assert "no serving endpoints in environment 'staging'" in cli("endpoints", "--env", "staging").stdout
    port = info["url"].rsplit(":", 1)[1]
    r = cli("serve", "--env", "prod", "--port", port, check=False, process=True)  # another environment on the busy port: who holds it, how to stop it
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot serve environment 'prod' on 127.0.0.1:{port}: the port is in use: the serving runtime of environment 'staging'" in r.stderr
    assert "serving-mlops serve --env staging --stop" in r.stderr
    r = cli("query", "--env", "staging", "-c", "1", check=False)
    assert r.returncode == 1 and "serving endpoint 'credit-default-staging' does not exist" in r.stderr
    assert "stopped" in cli("serve", "--env", "staging", "--stop").stdout
    assert server_info(env) is None
    r = cli("endpoints", "--env", "staging", check=False)
    assert r.returncode == 1 and "serving-mlops serve --env staging --background" in r.stderr
    assert "Serve the environment's endpoints" in cli("serve", "--help").stdout


def test_canary_promotes_a_sound_version_and_rolls_a_slow_one_back_by_itself(ws, capsys):
    from serving_mlops.deploy import DeploymentFailed, canary, deploy
    env, w = ws.env, ws.w
    name = env.var("endpoint_name")
    deploy(env, ws.v1, client=w)
    mlflow.set_tracking_uri(env.tracking_uri)
    ts = training_set(env, ws.store)  # the slow version is logged as a data scientist swaps the estimator: through the feature store
    example = model_example(ts.load_df().toPandas(), ws.columns)
    with mlflow.start_run():
        slow = ws.store.log_model(SlowClassifier(), "model", mlflow.sklearn, training_set=ts, feature_columns=ws.columns,
                                  input_example=example, signature=model_signature(SlowClassifier(), example))
    slow_version = str(mlflow.register_model(slow.model_uri, env.model_name).version)
    stop, statuses = threading.Event(), []
    def traffic():
        with httpx.Client() as client:
            i = 0
            while not stop.is_set():
                statuses.append(invoke(ws, name, {"dataframe_records": [ws.features(1 + i % 40)]}, client).status_code)
                i += 1
    with ThreadPoolExecutor(2) as pool:
        senders = [pool.submit(traffic) for _ in range(2)]
        try:
            report = canary(env, ws.v2, traffic=30, window_seconds=4, min_requests=10, max_latency_ratio=3, client=w)
            assert report.passed, report.summary()
            progress = capsys.readouterr().err  # the window's progress bar: version, traffic share, seconds of the window, elapsed, requests
            assert f"canary default_model-{ws.v2} at 30% of traffic: " in progress and "of 4 s of the window, 00:0" in progress, progress
            assert f" to default_model-{ws.v1}" in progress and "4 of 4 s of the window" in progress, progress
            routes = w.serving_endpoints.get(name).config.traffic_config.routes
            assert [(r.served_entity_name, r.traffic_percentage) for r in routes] == [(f"default_model-{ws.v2}", 100)]
            with pytest.raises(DeploymentFailed, match=r"\[FAILED\] latency(.|\n)*rolled back: restored the previous config"):
                canary(env, slow_version, traffic=30, window_seconds=4, min_requests=10, max_latency_ratio=3, client=w)
            routes = w.serving_endpoints.get(name).config.traffic_config.routes
            assert [(r.served_entity_name, r.traffic_percentage) for r in routes] == [(f"default_model-{ws.v2}", 100)]
        finally:
            stop.set()
            for f in senders: f.result()
    assert len(statuses) > 40 and set(statuses) == {200}


def test_cli_query_names_customers_the_feature_tables_do_not_know(ws, monkeypatch):
    env = ws.env
    create(ws, "cli-query", entity(ws, ws.v1))
    monkeypatch.setenv("SERVING_MLOPS_HOME", str(env.root.parent))  # the CLI process finds the module's workspace and runtime
    r = cli("query", "--env", env.name, "--endpoint", "cli-query", "-c", "1", "-c", "99999999")
    assert "customer 99999999: probability of default" in r.stdout and "(NOT FOUND: features imputed)" in r.stdout
    assert "customer 1: probability of default" in r.stdout and r.stdout.count("NOT FOUND") == 1
    assert "1 of 2 customers not found in the online feature tables: 99999999" in r.stderr
    r = cli("query", "--env", env.name, "--endpoint", "cli-query", "-c", "99999998", "-c", "99999999", check=False)
    assert r.returncode == 1 and "none of the customers is known to endpoint cli-query's feature tables" in r.stderr
    ws.w.serving_endpoints.delete("cli-query")


def test_the_sdk_reads_a_served_models_logs_and_build_logs_and_an_unknown_api_gets_json_it_can_read(ws):
    "Issue 31: `logs`, `build_logs` and `get_open_api` got Starlette's plain-text 404, which the SDK cannot parse ('unable to parse response'); the OpenAPI document describes what the endpoint takes."
    from databricks.sdk.errors import NotFound
    w, served = ws.w, f"default_model-{ws.v1}"
    create(ws, "logged", entity(ws, ws.v1))
    logs = w.serving_endpoints.logs("logged", served).logs
    assert "INFO serving_mlops.serving.runtime: endpoint logged: serving config version 1" in logs, logs
    build = w.serving_endpoints.build_logs("logged", served).logs.splitlines()
    assert build[0].startswith(f"no container build: this local serving runtime loads models:/dev.credit.default_model/{ws.v1} "), build
    sklearn = next(l for l in build if l.startswith("scikit-learn=="))
    assert sklearn.endswith("installed " + sklearn.split("==")[1].split(":")[0]), build  # the version it was trained with is the one here
    with pytest.raises(NotFound, match="serving endpoint 'logged' has no served model 'nope' \\(it has default_model-"):
        w.serving_endpoints.logs("logged", "nope")
    with pytest.raises(NotFound, match="No API found for 'GET /api/2.0/serving-endpoints/logged/permissions'"):
        w.api_client.do("GET", "/api/2.0/serving-endpoints/logged/permissions")
    # the query schema, from the served model's signature: what it accepts, the endpoint accepts, and what it refuses, the endpoint refuses
    from jsonschema import Draft202012Validator
    doc = orjson.loads(w.serving_endpoints.get_open_api("logged").contents.read())
    assert doc["openapi"] == "3.1.0" and f"/serving-endpoints/logged/served-models/{served}/invocations" in doc["paths"], sorted(doc["paths"])
    body = Draft202012Validator(doc["paths"]["/serving-endpoints/logged/invocations"]["post"]["requestBody"]["content"]["application/json"]["schema"])
    for request in ({"dataframe_records": [key(1)]}, {"dataframe_records": [{"snapshot_date": SNAPSHOT_DATE}]},
                    {"dataframe_split": {"columns": ["customer_id", "snapshot_date"], "data": [[1, SNAPSHOT_DATE]]}}):
        assert body.is_valid(request) == (invoke(ws, "logged", request).status_code == 200), request
    with pytest.raises(NotFound, match="serving endpoint 'nope' does not exist"):
        w.serving_endpoints.get_open_api("nope")
    # who may do what: the one token's owner manages every endpoint (the creator, as on Databricks); nothing else can be granted here
    from databricks.sdk.errors import InvalidParameterValue as Invalid
    from databricks.sdk.service.serving import ServingEndpointAccessControlRequest, ServingEndpointPermissionLevel
    me = w.current_user.me()
    ep = w.serving_endpoints.get("logged")
    acl = w.serving_endpoints.get_permissions(ep.id).access_control_list
    assert [(a.user_name, [p.permission_level.value for p in a.all_permissions]) for a in acl] == [(me.user_name, ["CAN_MANAGE"])] == [(ep.creator, ["CAN_MANAGE"])]
    assert [l.permission_level.value for l in w.serving_endpoints.get_permission_levels(ep.id).permission_levels] == ["CAN_MANAGE", "CAN_QUERY", "CAN_VIEW"]
    with pytest.raises(Invalid, match="permissions cannot be granted to others here"):
        w.serving_endpoints.set_permissions(ep.id, access_control_list=[ServingEndpointAccessControlRequest(
            user_name="someone@example.com", permission_level=ServingEndpointPermissionLevel.CAN_QUERY)])
    with pytest.raises(NotFound, match="no serving endpoint has id 'nope'"):
        w.serving_endpoints.get_permissions("nope")
