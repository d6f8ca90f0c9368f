"""The served workspace of the serving runtime's test modules, built once per session and served per module.

`TrainedWorld` is built once per pytest session (conftest's `trained_world` fixture): synthetic clients, feature tables
published online, two trained versions of the credit model and a small pyfunc model that raises on negative input.
`ServedWorkspace` is a runtime process against it, started and stopped by a module fixture (conftest's `ws`, or a
module's own with other options): `restart()` and `start()` change its `url` and client in one place, and stopping it
clears what the runtime saved (endpoints, request logs, inference folders, inference tables), so the next module starts
with no endpoints and no test depends on another module's."""
import shutil
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import cloudpickle
import httpx
import mlflow
import numpy as np
import pandas as pd
from databricks.sdk.service.serving import EndpointCoreConfigInput, ServedEntityInput, TrafficConfig

from serving_mlops.config import find_bundle, load_bundle
from serving_mlops.deploy import entity_stats, wait_not_updating
from serving_mlops.feature_store import example_workspace
from serving_mlops.registry import register_challenger
from serving_mlops.serving.app import serving_token
from serving_mlops.serving.capture import SERVED_ENTITIES_TABLE
from serving_mlops.serving.services import start_server, stop_server, workspace_client
from serving_mlops.serving.settings import RuntimeSettings
from serving_mlops.tables import tables_for
from serving_mlops.spark import get_spark
from serving_mlops.train import train

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the server process cannot import this test helper module


class Exploding(mlflow.pyfunc.PythonModel):
    "Doubles x; raises on negative x."
    def predict(self, context, model_input, params=None):
        if (model_input["x"] < 0).any(): raise ValueError("x must be non-negative")
        return model_input["x"] * 2


class SlowClassifier:
    "A worse estimator for the feature store's model: the same columns, P(default) 0.5 for every row, 40 ms per call."
    def predict_proba(self, X):
        time.sleep(0.04)
        return np.tile([0.5, 0.5], (len(X), 1))


class SlowToLoad(mlflow.pyfunc.PythonModel):
    "A version that takes 5 s to load (a served entity that is not ready within a short deployment timeout)."
    def load_context(self, context): time.sleep(5)
    def predict(self, context, model_input, params=None): return np.full(len(model_input), 0.5)


# what `serving-mlops query` sends as snapshot_date: the bundle's variable (a feature-store model's signature requires every key)
SNAPSHOT_DATE = str(load_bundle(find_bundle())["variables"]["snapshot_date"]["default"])


def key(cid, **values) -> dict:
    "A request row of customer `cid` by its lookup keys, with any feature `values` given (they override the lookups)."
    return {"customer_id": cid, "snapshot_date": SNAPSHOT_DATE, **values}


METRICS_INTERVAL = 1.0  # seconds per value of the runtime's metrics export (a minute on Databricks)


class TrainedWorld:
    "A dev workspace under `home` with two registered versions of the credit model, an exploding model and online tables."
    def __init__(self, home: Path):
        self.env, self.store = example_workspace(2_000, seed=3, spark=get_spark(), home=home)
        for t in ("behaviour_features", "demographic_features"): self.store.publish_table(self.env.table_name(t))
        self.v1 = str(register_challenger(self.env, train(self.env, n_trials=1, seed=1, store=self.store, progress=False)).version)
        self.v2 = str(register_challenger(self.env, train(self.env, n_trials=1, seed=2, store=self.store, progress=False)).version)
        self.use_mlflow()
        with mlflow.start_run():
            x = pd.DataFrame({"x": [1.0, 2.0]})
            mlflow.pyfunc.log_model(name="exploding", python_model=Exploding(), registered_model_name="dev.credit.exploding_model",
                                    signature=mlflow.models.infer_signature(x, x["x"] * 2), pip_requirements=["mlflow"])
        self.model = mlflow.pyfunc.load_model(f"models:/{self.env.var('model_name')}/{self.v1}")
        self.columns = self.model.unwrap_python_model().feature_spec["model_columns"]
        self.online = self.store.online_store()
        self.token = serving_token(self.env)

    def use_mlflow(self):
        "MLflow's fluent API on this workspace (the tests log models with it)."
        mlflow.set_tracking_uri(self.env.tracking_uri); mlflow.set_registry_uri(self.env.registry_uri)

    def features(self, cid: int) -> dict:
        "A request's row for customer `cid`: its keys (the model's signature requires them) and the model's columns as the online store has them."
        row = {**self.online.lookup(self.env.table_name("behaviour_features"), cid),
               **self.online.lookup(self.env.table_name("demographic_features"), cid)}
        return {"customer_id": cid, "snapshot_date": row["snapshot_date"], **{c: float(row[c]) for c in self.columns}}


class ServedWorkspace:
    "A serving runtime of `world`'s environment with `workers` processes; the world's parts are read through it."
    def __init__(self, world: TrainedWorld, workers: int = 1):
        self.world, self.workers = world, workers
        self.env, self.store, self.v1, self.v2 = world.env, world.store, world.v1, world.v2
        self.model, self.columns, self.features, self.token = world.model, world.columns, world.features, world.token
        self.start()

    def start(self) -> dict:
        "Start the runtime (after a stop or a kill: it restores every saved endpoint); the client follows its new address."
        info = start_server(self.env, settings=RuntimeSettings(metrics_interval=METRICS_INTERVAL), workers=self.workers)
        self.url, self.w = info["url"], workspace_client(self.env)
        return info

    def restart(self) -> dict:
        "Stop the runtime gracefully and start it again."
        assert stop_server(self.env), "the runtime was not running"
        return self.start()

    def close(self):
        "Stop the runtime and clear what it saved, so that the next module's runtime starts with no endpoints."
        stop_server(self.env)
        self.world.use_mlflow()  # a test may have pointed MLflow's fluent API elsewhere
        shutil.rmtree(self.env.path("serving"), ignore_errors=True)
        tables = tables_for(self.env)
        for name in [t for t in tables.list() if t.endswith("_payload") or t == SERVED_ENTITIES_TABLE]:
            shutil.rmtree(tables.path(name))


def entity(ws, version, name=None):
    return ServedEntityInput(entity_name=ws.env.var("model_name"), entity_version=version, name=name)


WAIT = timedelta(minutes=20)  # the SDK waiters' default


def create(ws, name, *entities, routes=None, **kw):
    "Create an endpoint through the SDK and wait until it is ready (polled as `deploy` polls: `wait_not_updating`)."
    config = EndpointCoreConfigInput(name=name, served_entities=list(entities),
                                     traffic_config=TrafficConfig(routes=routes) if routes else None)
    ws.w.serving_endpoints.create(name, config=config, **kw)
    return wait_not_updating(ws.w, name, WAIT)


def update(w, name, **kw):
    "Update an endpoint's config through the SDK and wait until it is done (`wait_not_updating`)."
    w.serving_endpoints.update_config(name, **kw)
    return wait_not_updating(w, name, WAIT)


def invoke(ws, name, payload, client=None, token=None):
    "POST an invocation over HTTP; returns the response."
    headers = {"Authorization": f"Bearer {token or ws.token}"}
    client = client or httpx
    body = payload if isinstance(payload, (bytes, str)) else None
    return client.post(f"{ws.url}/serving-endpoints/{name}/invocations", headers=headers,
                       content=body, json=None if body is not None else payload, timeout=60)


def in_process(ws, rows):
    "The registered model's predictions for request `rows` (keys and feature values), in this process."
    return ws.model.predict(pd.DataFrame(rows).astype({c: float for c in ws.columns}))


class MetricReadings:
    "Polls an endpoint's metrics export while the block runs (and one interval after), keeping each interval's values once."
    def __init__(self, ws, name: str):
        self.ws, self.name, self.readings, self.stop = ws, name, {}, threading.Event()

    def read(self):
        for entity, minutes in entity_stats(self.ws.w.serving_endpoints.export_metrics(self.name).contents.read().decode()).items():
            self.readings.setdefault(entity, {}).update(minutes)

    def _poll(self):
        while not self.stop.wait(METRICS_INTERVAL / 8): self.read()  # each interval is shown for one interval: read it several times

    def __enter__(self):
        self.thread = threading.Thread(target=self._poll, daemon=True); self.thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(2.5 * METRICS_INTERVAL)  # the last interval with requests is complete and read
        self.stop.set(); self.thread.join(); self.read()

    def total(self, entity: str, field: str = "requests") -> float:
        return sum(v[field] for v in self.readings.get(entity, {}).values())
