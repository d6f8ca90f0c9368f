"""Scale to zero, on the runtime's ASGI app in process: an idle served entity is unloaded and GET says so, the next
requests wait for one load up to a bound (then 503 with `Retry-After`), a load that fails is a clear 503 and the entity
recovers, and an entity without `scale_to_zero_enabled` never unloads.

One small pyfunc model, registered once for the module in a throwaway workspace: it takes `LOAD_S` to load, and refuses
to load while a flag file exists (a model whose load on demand fails, then works again)."""
import asyncio
import gc
import logging
import weakref
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import infer_signature
from starlette.testclient import TestClient

from serving_mlops.config import get_environment, workspace_home
from serving_mlops.feature_store import in_experiment
from serving_mlops.naming import experiment_name
from serving_mlops.serving.app import make_app, serving_token
from serving_mlops.serving.runtime import ServingRuntime
from serving_mlops.serving.settings import RuntimeSettings
from serving_mlops.serving.workers import SharedState, Workers

LOAD_S = 0.2  # seconds the model takes to load
IDLE_S = 0.2  # the runtime's scale_to_zero_idle_s in these tests


class SlowToWake(mlflow.pyfunc.PythonModel):
    "Loads in LOAD_S seconds; refuses to load while the file named by $WAKE_FAILS exists; predicts 2x."
    def load_context(self, context):
        if Path(os.environ.get("WAKE_FAILS", "/nonexistent")).exists(): raise RuntimeError("the flag file says no")
        time.sleep(LOAD_S)
    def predict(self, context, model_input, params=None): return 2 * model_input["x"].to_numpy()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with workspace_home(tmp_path_factory.mktemp("scale")): env = get_environment("dev")
    X = pd.DataFrame({"x": [1.0, 2.0]})
    with in_experiment(env, experiment_name(env, "training")), mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=SlowToWake(), registered_model_name="dev.credit.wake",
                                signature=infer_signature(X, np.array([2.0, 4.0])), pip_requirements=["mlflow"])
    return env


@pytest.fixture
def serving(env, caplog, monkeypatch, tmp_path):
    "A client of the app with endpoint `wake` serving `cold` (scales to zero) and `warm` (does not), both loaded."
    monkeypatch.setenv("WAKE_FAILS", str(tmp_path / "fails"))
    caplog.set_level(logging.INFO, logger="serving_mlops.serving")  # the server logs API returns INFO lines

    def start(wait_s: float):
        client = TestClient(make_app(env, RuntimeSettings(scale_to_zero_idle_s=IDLE_S, scale_up_wait_s=wait_s)))
        client.headers["Authorization"] = f"Bearer {serving_token(env)}"
        client.__enter__()
        entity = {"entity_name": "dev.credit.wake", "entity_version": "1"}
        r = client.post("/api/2.0/serving-endpoints", json={"name": "wake", "config": {
            "served_entities": [{**entity, "name": "cold", "scale_to_zero_enabled": True}, {**entity, "name": "warm"}],
            "traffic_config": {"routes": [{"served_entity_name": "cold", "traffic_percentage": 100},
                                          {"served_entity_name": "warm", "traffic_percentage": 0}]}}})
        assert r.status_code == 200, r.text
        until(lambda: get(client)["state"]["ready"] == "READY")
        started.append(client)
        return client
    started = []
    yield start
    for client in started:
        client.delete("/api/2.0/serving-endpoints/wake")  # the module's workspace holds no endpoint between tests
        client.__exit__(None, None, None)


def until(condition, timeout: float = 10.0):
    "Wait for `condition()` (polling); fail after `timeout` seconds."
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def get(client) -> dict: return client.get("/api/2.0/serving-endpoints/wake").json()

def states(client) -> dict:
    "Served entity -> (deployment, deployment_state_message) as GET shows them."
    return {e["name"]: (e["state"]["deployment"], e["state"]["deployment_state_message"])
            for e in get(client)["config"]["served_entities"]}

def invoke(client, served: str = "cold"):
    return client.post(f"/serving-endpoints/wake/served-models/{served}/invocations",
                       json={"dataframe_records": [{"x": 1.5}]})

def logs(client) -> str:
    return client.get("/api/2.0/serving-endpoints/wake/served-models/cold/logs").json()["logs"]


def test_an_idle_entity_scales_to_zero_and_concurrent_requests_wait_for_one_load(serving):
    client = serving(wait_s=10)
    loaded = weakref.ref(client.app.state.runtime.endpoints["wake"].snapshot.models["cold"])
    until(lambda: states(client)["cold"][1].startswith("Scaled to zero"))
    gc.collect()
    assert loaded() is None  # the model unloaded: nothing holds it any more
    assert get(client)["state"]["ready"] == "READY" and states(client)["cold"][0] == "DEPLOYMENT_READY"
    assert states(client)["warm"] == ("DEPLOYMENT_READY", "")  # without scale_to_zero_enabled: never unloaded
    with ThreadPoolExecutor(3) as pool: answers = list(pool.map(lambda _: invoke(client), range(3)))
    assert [(r.status_code, r.json()) for r in answers] == [(200, {"predictions": [3.0]})] * 3
    assert logs(client).count("loaded on demand") == 1 and "'cold' scaled to zero after" in logs(client)
    assert states(client)["cold"] == ("DEPLOYMENT_READY", "")  # serving again (until it idles anew)
    assert invoke(client, "warm").json() == {"predictions": [3.0]}


def test_past_the_bound_a_request_gets_503_with_retry_after_while_the_load_goes_on(serving):
    client = serving(wait_s=0.05)  # shorter than the model's load
    until(lambda: states(client)["cold"][1].startswith("Scaled to zero"))
    r = invoke(client)
    assert (r.status_code, r.json()["error_code"], r.headers["retry-after"]) == (503, "TEMPORARILY_UNAVAILABLE", "1")
    assert "serving endpoint 'wake': served entity 'cold' is scaled to zero and still loading" in r.json()["message"]
    until(lambda: "loaded on demand" in logs(client))  # the load went on without a waiting request
    assert (invoke(client).status_code, logs(client).count("loaded on demand")) == (200, 1)


def test_a_load_that_fails_is_a_503_naming_why_and_the_entity_recovers(serving, tmp_path):
    client = serving(wait_s=10)
    until(lambda: states(client)["cold"][1].startswith("Scaled to zero"))
    (tmp_path / "fails").touch()
    r = invoke(client)
    assert (r.status_code, r.json()["error_code"]) == (503, "TEMPORARILY_UNAVAILABLE")
    assert "retry-after" not in r.headers  # it will not load by waiting
    message = r.json()["message"]
    assert "serving endpoint 'wake': scaled to zero and could not load again: served entity 'cold'" in message
    assert "the flag file says no" in message and "Traceback" not in r.text
    assert (get(client)["state"]["ready"], states(client)["cold"][0]) == ("NOT_READY", "DEPLOYMENT_RECOVERING")
    (tmp_path / "fails").unlink()
    assert invoke(client).json() == {"predictions": [3.0]}  # the next request loads it
    assert (get(client)["state"]["ready"], states(client)["cold"]) == ("READY", ("DEPLOYMENT_READY", ""))


def test_with_workers_get_says_scaled_to_zero_once_every_worker_has_unloaded_it(env, tmp_path):
    "Two runtimes as the workers of one environment (in process: the same records, lock and files as two processes)."
    async def run():
        runtimes = [ServingRuntime(env, RuntimeSettings(scale_to_zero_idle_s=IDLE_S),
                                   Workers(SharedState(tmp_path / "workers", i))) for i in (0, 1)]
        message = lambda rt: rt.get("shared").to_json("")["config"]["served_entities"][0]["state"][  # noqa: E731
            "deployment_state_message"]
        try:
            entity = {"entity_name": "dev.credit.wake", "entity_version": "1", "name": "cold",
                      "scale_to_zero_enabled": True}
            runtimes[0].create({"name": "shared", "config": {"served_entities": [entity]}})
            # both load it (each follows what the other saved when asked: `_follow_forever` in a server)
            while not all([rt.get("shared").snapshot for rt in runtimes]): await asyncio.sleep(0.02)
            later = time.monotonic() + 60
            assert runtimes[0].scale_idle(later) == [("shared", "cold")]
            assert [message(rt) for rt in runtimes] == ["", ""]  # worker 1 still holds it
            assert runtimes[1].scale_idle(later) == [("shared", "cold")]
            assert all(message(rt).startswith("Scaled to zero") for rt in runtimes)  # on whichever worker GET lands
            answer, _ = await runtimes[1].invoke("shared", b'{"dataframe_records": [{"x": 1.5}]}', "r-1")
            assert (answer, [message(rt) for rt in runtimes]) == ({"predictions": [3.0]}, ["", ""])
            runtimes[0].delete("shared")
        finally:
            for rt in runtimes: rt.close()
    asyncio.run(run())
