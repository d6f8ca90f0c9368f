"""Change is the everyday job: the model swapped for another estimator, as docs/training-and-registry.md's how-to does it,
and models unlike the demo's served with the answers MLflow's scoring server gives.

The module serves the session's trained world (tests/served.py) in a runtime of its own; each swapped model is trained
through `train` with the how-to's two replacements (the pipeline and its search space), registered without moving an
alias (the world's aliases belong to the other modules), deployed to an endpoint of its own and tested as the deploy job
tests every version: schema, golden sample, keys only in both callers' formats compared with the in-process model.
"""
import dataclasses
import sys

import cloudpickle
import httpx
import mlflow
import pytest
from lightgbm import LGBMClassifier
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from serving_mlops.config import using_mlflow
from serving_mlops.deploy import deploy, endpoint_tests
from serving_mlops.train import CATEGORICAL, train


def prep(columns, scale: bool) -> ColumnTransformer:
    "The demo's preparation (median imputation, one-hot categories), numbers scaled for a linear model."
    numeric = [c for c in columns if c not in CATEGORICAL]
    steps = [("impute", SimpleImputer(strategy="median"))] + ([("scale", StandardScaler())] if scale else [])
    return ColumnTransformer([
        ("numeric", Pipeline(steps), numeric),
        ("categorical", Pipeline([("impute", SimpleImputer(strategy="most_frequent")),
                                  ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False))]),
         [c for c in columns if c in CATEGORICAL])])


def logistic(columns, seed=42, C=1.0):
    return Pipeline([("prep", prep(columns, True)), ("model", LogisticRegression(C=C, max_iter=500, random_state=seed))])


def lightgbm(columns, seed=42, num_leaves=15, learning_rate=0.1):
    return Pipeline([("prep", prep(columns, False)),
                     ("model", LGBMClassifier(num_leaves=num_leaves, learning_rate=learning_rate, n_estimators=50,
                                              random_state=seed, n_jobs=1, verbose=-1))])


SWAPS = {
    "logistic": (logistic, lambda t: {"C": t.suggest_float("C", 0.01, 10.0, log=True)}),
    "lightgbm": (lightgbm, lambda t: {"num_leaves": t.suggest_int("num_leaves", 7, 31),
                                      "learning_rate": t.suggest_float("learning_rate", 0.03, 0.3, log=True)}),
}


@pytest.mark.parametrize("kind", sorted(SWAPS))
def test_a_swapped_model_trains_serves_and_passes_its_endpoint_tests(ws, kind):
    pipeline, space = SWAPS[kind]
    result = train(ws.env, n_trials=1, seed=5, store=ws.store, progress=False, pipeline=pipeline, space=space)
    with using_mlflow(ws.env): version = mlflow.register_model(result.model_uri, ws.env.model_name).version
    assert result.metrics["val_roc_auc"] > 0.6, result.metrics  # it learned something
    endpoint = f"swap-{kind}"
    try:
        deploy(ws.env, str(version), endpoint=endpoint, client=ws.w)
        report = endpoint_tests(ws.env, str(version), endpoint, requests=5, client=ws.w)
        checks = {name: (ok, detail) for name, ok, detail in report.checks}
        # every check but latency, which would measure this machine shared with the suite
        assert list(checks) == ["schema", "golden_sample", "keys_only dataframe_records", "keys_only dataframe_split", "latency", "error_rate"]
        assert all(ok for name, (ok, _) in checks.items() if name != "latency"), report.summary()
        assert "largest difference from the in-process model on the rows it looks up" in checks["keys_only dataframe_split"][1]
    finally:
        ws.w.serving_endpoints.delete(endpoint)


# --- any MLflow model, answered as MLflow's scoring server answers --------------------------------------------------------

class Labeller(mlflow.pyfunc.PythonModel):
    "A custom pyfunc returning a DataFrame of a score and a text label."
    def predict(self, context, model_input, params=None):
        import pandas as pd
        score = model_input["n"].astype(float) * (params or {}).get("scale", 1.0)
        return pd.DataFrame({"score": score, "label": ["high" if s > 2 else "low" for s in score]})


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the runtime process cannot import this test module


class Summer(mlflow.pyfunc.PythonModel):
    "A model of arrays (a tensor signature): each row's sum."
    def predict(self, context, model_input, params=None): return model_input.sum(axis=1)


def colour_pipeline():
    "A scikit-learn classifier over a text column (one-hot encoded) and an integer column."
    import pandas as pd
    X = pd.DataFrame({"colour": ["red", "blue", "green", "red", "blue", "green"] * 5, "n": list(range(30))})
    y = (X.n % 3 == 0).astype(int)
    model = Pipeline([("prep", ColumnTransformer([("onehot", OneHotEncoder(handle_unknown="ignore"), ["colour"])], remainder="passthrough")),
                      ("model", LogisticRegression(max_iter=500))]).fit(X, y)
    return model, X


def log_models(ws) -> dict:
    "Two models unlike the demo's, registered in the world's registry: name -> (registered model, requests in every format it allows)."
    import pandas as pd
    from mlflow.models import infer_signature
    ws.world.use_mlflow()
    model, X = colour_pipeline()
    with mlflow.start_run():
        mlflow.sklearn.log_model(model, name="m", signature=infer_signature(X, model.predict(X)), input_example=X.head(3),
                                 registered_model_name="dev.credit.colours", pip_requirements=["scikit-learn"])
    frame = pd.DataFrame({"n": [1, 2, 3]})
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="m", python_model=Labeller(), registered_model_name="dev.credit.labeller", pip_requirements=["mlflow"],
                                signature=infer_signature(frame, Labeller().predict(None, frame), params={"scale": 1.0}), input_example=frame)
    import numpy as np
    from mlflow.types import Schema, TensorSpec
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="m", python_model=Summer(), registered_model_name="dev.credit.summer", pip_requirements=["mlflow"],
                                signature=mlflow.models.ModelSignature(inputs=Schema([TensorSpec(np.dtype("float64"), (-1, 3))]),
                                                                       outputs=Schema([TensorSpec(np.dtype("float64"), (-1,))])))
    rows = [{"colour": "red", "n": 3}, {"colour": "purple", "n": 4}]  # an unknown category too
    split = {"columns": ["colour", "n"], "data": [["red", 3], ["purple", 4]]}
    return {"colours": ["dev.credit.colours", [{"dataframe_records": rows}, {"dataframe_split": split}, {"instances": rows},
                                              {"inputs": {"colour": ["red", "purple"], "n": [3, 4]}},
                                              {"dataframe_records": [{"colour": "red", "n": 3.5}]},  # not a long
                                              {"dataframe_records": [{"colour": 7, "n": 3}]}]],
            "summer": ["dev.credit.summer", [{"instances": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]]}, {"inputs": [[1.0, 2.0, 3.0]]},
                                            {"instances": [[1.0, 2.0]]}, {"inputs": {"x": [[1.0, 2.0, 3.0]]}},
                                            {"dataframe_split": {"columns": ["a", "b", "c"], "data": [[1.0, 2.0, 3.0]]}}]],
            "labeller": ["dev.credit.labeller", [{"dataframe_records": [{"n": 1}, {"n": 5}]}, {"dataframe_records": [{"n": 1}], "params": {"scale": 4.0}},
                                                {"inputs": {"n": [2, 3]}}, {"dataframe_records": [{"n": "one"}]}]]}


@pytest.fixture(scope="module")
def unlike(ws):
    return log_models(ws)


def test_models_unlike_the_demos_get_the_answers_mlflows_scoring_server_gives(ws, unlike):
    """Issue 30: text and integer columns, a DataFrame answer with text in it, params, a tensor signature; each request sent to the runtime over
    HTTP and to MLflow's own scoring server in process: the same status, the same predictions (or error code)."""
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient
    from served import create, invoke
    from databricks.sdk.service.serving import ServedEntityInput
    for name, (model, requests) in unlike.items():
        create(ws, name, ServedEntityInput(entity_name=model, entity_version="1"))
        try:
            with TestClient(scoring_server.init(mlflow.pyfunc.load_model(f"models:/{model}/1"))) as mlflow_server:
                for request in requests:
                    theirs, ours = mlflow_server.post("/invocations", json=request), invoke(ws, name, request)
                    assert ours.status_code == theirs.status_code, (name, request, ours.text, theirs.text)
                    if theirs.status_code == 200: assert ours.json()["predictions"] == theirs.json()["predictions"], (name, request, ours.text)
                    else: assert ours.status_code == 400, (name, request, ours.text)
            if name != "summer":  # the deploy job's endpoint tests work for any model with a column signature and an input example
                report = endpoint_tests(dataclasses.replace(ws.env, variables={**ws.env.variables, "model_name": model}), "1", name,
                                        requests=3, client=ws.w)
                assert [c for c, ok, _ in report.checks if not ok and c != "latency"] == [], report.summary()
                assert [c for c, _, _ in report.checks] == ["schema", "golden_sample", "latency", "error_rate"], report.summary()
        finally:
            ws.w.serving_endpoints.delete(name)


def test_one_endpoint_serves_different_models_each_in_its_own_format(ws, unlike):
    """Issue 30 item 4: served entities of different registered models behind one endpoint with a traffic split; each
    served model is also reachable alone (`/served-models/{name}/invocations`, as on Databricks) and answers in its own format;
    the endpoint's OpenAPI document gives each its own request schema."""
    import orjson
    from jsonschema import Draft202012Validator
    from databricks.sdk.service.serving import Route, ServedEntityInput
    from served import create
    colours, summer = (ServedEntityInput(entity_name=unlike[n][0], entity_version="1", name=n) for n in ("colours", "summer"))
    create(ws, "mixed", colours, summer, routes=[Route(50, served_entity_name="colours"), Route(50, served_entity_name="summer")])
    try:
        asks = {"colours": {"dataframe_records": [{"colour": "red", "n": 3}]}, "summer": {"instances": [[1.0, 2.0, 3.0]]}}
        doc = orjson.loads(ws.w.serving_endpoints.get_open_api("mixed").contents.read())
        with httpx.Client(headers={"Authorization": f"Bearer {ws.token}"}, timeout=30) as client:
            for name, body in asks.items():
                r = client.post(f"{ws.url}/serving-endpoints/mixed/served-models/{name}/invocations", json=body)
                assert r.status_code == 200 and r.headers["served-model-name"] == name, r.text
                assert r.json()["predictions"] == ([1] if name == "colours" else [6.0]), r.text
                path = doc["paths"][f"/serving-endpoints/mixed/served-models/{name}/invocations"]["post"]
                schema = Draft202012Validator(path["requestBody"]["content"]["application/json"]["schema"])
                assert schema.is_valid(body), (name, path)
                if name == "colours": assert not schema.is_valid(asks["summer"])  # (a tensor model's document checks only the envelope)
            seen = {client.post(f"{ws.url}/serving-endpoints/mixed/invocations", json=asks["summer"]).status_code for _ in range(20)}
            assert seen == {200, 400}, seen  # the split sends a summer request to colours about half the time: refused there, by its signature
            r = client.post(f"{ws.url}/serving-endpoints/mixed/served-models/nope/invocations", json=asks["summer"])
            assert (r.status_code, r.json()["error_code"]) == (404, "RESOURCE_DOES_NOT_EXIST") and "colours, summer" in r.json()["message"]
    finally:
        ws.w.serving_endpoints.delete("mixed")
