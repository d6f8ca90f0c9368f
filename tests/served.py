"""A served workspace shared by the test modules of the serving runtime: synthetic clients, feature tables published
online, two trained versions of the credit model, a small pyfunc model that raises on negative input, a running runtime
process, and helpers that drive it through databricks-sdk and HTTP. Each module makes its own with a module-scoped fixture:
`ws = pytest.fixture(scope="module")(served_workspace)`."""
import sys
import threading
import time

import cloudpickle
import httpx
import mlflow
import numpy as np
import pandas as pd
from databricks.sdk.service.serving import EndpointCoreConfigInput, ServedEntityInput, TrafficConfig

from serving_mlops.deploy import entity_stats
from serving_mlops.feature_store import example_workspace
from serving_mlops.registry import register_challenger
from serving_mlops.serving.app import serving_token
from serving_mlops.serving.process import start_server, stop_server, workspace_client
from serving_mlops.tables import get_spark
from serving_mlops.train import train

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the server process cannot import this test helper module


class Exploding(mlflow.pyfunc.PythonModel):
    "Doubles x; raises on negative x."
    def predict(self, context, model_input, params=None):
        if (model_input["x"] < 0).any(): raise ValueError("x must be non-negative")
        return model_input["x"] * 2


class Slow(mlflow.pyfunc.PythonModel):
    "A worse version: right columns, 40 ms per call."
    def predict(self, context, model_input, params=None):
        time.sleep(0.04)
        return np.full(len(model_input), 0.5)


class SlowToLoad(mlflow.pyfunc.PythonModel):
    "A version that takes 8 s to load (a served entity that is not ready within a short deployment timeout)."
    def load_context(self, context): time.sleep(8)
    def predict(self, context, model_input, params=None): return np.full(len(model_input), 0.5)


METRICS_INTERVAL = 1.0  # seconds per value of the runtime's metrics export (a minute on Databricks)


class MetricReadings:
    "Polls an endpoint's metrics export while the block runs (and one interval after), keeping each interval's values once."
    def __init__(self, ws, name: str):
        self.ws, self.name, self.readings, self.stop = ws, name, {}, threading.Event()

    def read(self):
        for entity, minutes in entity_stats(self.ws["w"].serving_endpoints.export_metrics(self.name).contents.read().decode()).items():
            self.readings.setdefault(entity, {}).update(minutes)

    def _poll(self):
        while not self.stop.wait(METRICS_INTERVAL / 4): self.read()

    def __enter__(self):
        self.thread = threading.Thread(target=self._poll, daemon=True); self.thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(2.5 * METRICS_INTERVAL)  # the last interval with requests is complete and read
        self.stop.set(); self.thread.join(); self.read()

    def total(self, entity: str, field: str = "requests") -> float:
        return sum(v[field] for v in self.readings.get(entity, {}).values())


def served_workspace(workers: int = 1):
    "A workspace with two registered versions, an exploding model, published online tables and a running runtime of `workers` processes (a generator: yields the dict the tests use, then stops the runtime)."
    env, store = example_workspace(2_000, seed=3, spark=get_spark())
    for t in ("behaviour_features", "demographic_features"): store.publish_table(env.table_name(t))
    v1 = register_challenger(env, train(env, n_trials=1, seed=1, store=store, progress=False)).version
    v2 = register_challenger(env, train(env, n_trials=1, seed=2, store=store, progress=False)).version
    mlflow.set_tracking_uri(env.tracking_uri); mlflow.set_registry_uri(env.registry_uri)  # the fixture uses MLflow's fluent API on this workspace
    with mlflow.start_run():
        x = pd.DataFrame({"x": [1.0, 2.0]})
        mlflow.pyfunc.log_model(name="exploding", python_model=Exploding(), registered_model_name="dev.credit.exploding_model",
                                signature=mlflow.models.infer_signature(x, x["x"] * 2), pip_requirements=["mlflow"])
    info = start_server(env, metrics_interval=METRICS_INTERVAL, workers=workers)
    w = workspace_client(env)
    model = mlflow.pyfunc.load_model(f"models:/{env.var('model_name')}/{v1}")
    columns = model.unwrap_python_model().feature_spec["model_columns"]
    online = store.online_store()
    def features(cid):
        row = {**online.lookup(env.table_name("behaviour_features"), cid), **online.lookup(env.table_name("demographic_features"), cid)}
        return {c: float(row[c]) for c in columns}
    yield {"env": env, "store": store, "v1": str(v1), "v2": str(v2), "url": info["url"], "w": w, "model": model,
           "columns": columns, "features": features, "token": serving_token(env)}
    stop_server(env)


def entity(ws, version, name=None):
    return ServedEntityInput(entity_name=ws["env"].var("model_name"), entity_version=version, name=name)


def create(ws, name, *entities, routes=None, **kw):
    "Create an endpoint through the SDK and wait until it is ready."
    config = EndpointCoreConfigInput(name=name, served_entities=list(entities),
                                     traffic_config=TrafficConfig(routes=routes) if routes else None)
    return ws["w"].serving_endpoints.create_and_wait(name, config=config, **kw)


def invoke(ws, name, payload, client=None, token=None):
    "POST an invocation over HTTP; returns the response."
    headers = {"Authorization": f"Bearer {token or ws['token']}"}
    client = client or httpx
    body = payload if isinstance(payload, (bytes, str)) else None
    return client.post(f"{ws['url']}/serving-endpoints/{name}/invocations", headers=headers,
                       content=body, json=None if body is not None else payload, timeout=60)


def in_process(ws, rows):
    return ws["model"].predict(pd.DataFrame(rows, columns=ws["columns"]).astype(float))


