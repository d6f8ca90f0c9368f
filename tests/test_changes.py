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


def log_baseline(frame, predictions=None):
    "The model's training baseline where monitoring looks for one (its run's monitoring/baseline.json)."
    from serving_mlops.drift import training_baseline
    if predictions is not None: frame = frame.assign(prediction=list(predictions))
    mlflow.log_dict(training_baseline(frame, [], None if predictions is None else "prediction"), "monitoring/baseline.json")


def log_models(ws) -> dict:
    "Two models unlike the demo's, registered in the world's registry: name -> (registered model, requests in every format it allows)."
    import pandas as pd
    from mlflow.models import infer_signature
    ws.world.use_mlflow()
    model, X = colour_pipeline()
    with mlflow.start_run():
        mlflow.sklearn.log_model(model, name="m", signature=infer_signature(X, model.predict(X)), input_example=X.head(3),
                                 registered_model_name="dev.credit.colours", pip_requirements=["scikit-learn"])
        log_baseline(X, model.predict(X))  # text, a long, labels
    frame = pd.DataFrame({"n": [1, 2, 3]})
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="m", python_model=Labeller(), registered_model_name="dev.credit.labeller", pip_requirements=["mlflow"],
                                signature=infer_signature(frame, Labeller().predict(None, frame), params={"scale": 1.0}), input_example=frame)
        log_baseline(frame)  # its answers are records: monitoring leaves them out, naming why
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


class Greeter(mlflow.pyfunc.PythonModel):
    "A custom pyfunc over text, boolean and datetime columns answering text."
    def predict(self, context, model_input, params=None):
        return [f"{'Dear' if formal else 'Hi'} {name} ({when:%Y})" for name, formal, when in
                zip(model_input["name"], model_input["formal"], model_input["when"])]


class Shapeless(mlflow.pyfunc.PythonModel):
    "A model answering a dict of lists (logged with an input signature only, and once without any)."
    def predict(self, context, model_input, params=None):
        import pandas as pd
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return {"rows": [len(frame)], "columns": sorted(map(str, frame.columns))}


def more_models(ws) -> dict:
    "Four more kinds: a regressor with an optional input, a multiclass classifier of text labels, text/boolean/datetime inputs, a dict answer."
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.types import ColSpec, Schema
    from sklearn.ensemble import HistGradientBoostingRegressor
    ws.world.use_mlflow()
    rng = np.random.default_rng(3)
    X = pd.DataFrame({"x": rng.normal(size=200), "y": rng.normal(size=200)})
    X.loc[::9, "y"] = np.nan
    regressor = HistGradientBoostingRegressor(max_iter=20).fit(X, X.x * 2 + X.y.fillna(0))
    optional = mlflow.models.ModelSignature(inputs=Schema([ColSpec("double", "x"), ColSpec("double", "y", required=False)]),
                                            outputs=Schema([ColSpec("double")]))
    with mlflow.start_run():
        mlflow.sklearn.log_model(regressor, name="m", signature=optional, input_example=X.head(3), registered_model_name="dev.credit.regressor",
                                 pip_requirements=["scikit-learn"], serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_CLOUDPICKLE)
        log_baseline(X, regressor.predict(X))
    labels = np.array(["low", "mid", "high"])[(X.x > -0.5).astype(int) + (X.x > 0.5).astype(int)]
    multiclass = LogisticRegression(max_iter=500).fit(X[["x"]], labels)
    with mlflow.start_run():
        mlflow.sklearn.log_model(multiclass, name="m", signature=infer_signature(X[["x"]], multiclass.predict(X[["x"]])),
                                 input_example=X[["x"]].head(3), registered_model_name="dev.credit.multiclass", pip_requirements=["scikit-learn"])
        log_baseline(X[["x"]], multiclass.predict(X[["x"]]))  # text labels
    people = pd.DataFrame({"name": ["Ada", "Bo"], "formal": [True, False], "when": pd.to_datetime(["2024-01-02", "2025-06-30"])})
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="m", python_model=Greeter(), registered_model_name="dev.credit.greeter", pip_requirements=["mlflow"],
                                # its answer as a Series: MLflow asks whether a list is a Spark frame by importing pyspark's
                                # connect module, which exits a pytest-xdist worker (no __main__ file) when grpc is absent
                                signature=infer_signature(people, pd.Series(Greeter().predict(None, people))), input_example=people)
        log_baseline(people, Greeter().predict(None, people))  # text, booleans, times (left out, named), text answers
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="m", python_model=Shapeless(), registered_model_name="dev.credit.shapeless", pip_requirements=["mlflow"],
                                signature=mlflow.models.ModelSignature(inputs=Schema([ColSpec("long", "a"), ColSpec("string", "b", required=False)])))
        log_baseline(pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}))  # its answer is a dict: left out, named
    with mlflow.start_run():  # Unity Catalog registers no model without a signature: Model Serving never serves one
        mlflow.pyfunc.log_model(name="m", python_model=Shapeless(), registered_model_name="dev.credit.unsigned", pip_requirements=["mlflow"])
    return {"regressor": ["dev.credit.regressor", [{"dataframe_records": [{"x": 0.5, "y": 1.0}, {"x": -1.0, "y": None}, {"x": 2.0}]},
                                                  {"dataframe_split": {"columns": ["x", "y"], "data": [[0.1, 0.2]]}},
                                                  {"inputs": {"x": [0.3], "y": [None]}}, {"instances": [{"x": 1.5}]},
                                                  {"dataframe_records": [{"y": 1.0}]},  # the required input missing
                                                  {"dataframe_records": [{"x": "big"}]}]],
            "multiclass": ["dev.credit.multiclass", [{"dataframe_records": [{"x": -2.0}, {"x": 0.0}, {"x": 3.0}]},
                                                    {"inputs": {"x": [0.7]}}, {"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}]],
            "greeter": ["dev.credit.greeter", [{"dataframe_records": [{"name": "Cy", "formal": True, "when": "2026-12-07"}]},
                                              {"dataframe_split": {"columns": ["name", "formal", "when"], "data": [["Di", False, "2020-02-29T10:00:00"]]}},
                                              {"inputs": {"name": ["Ed"], "formal": [True], "when": ["2021-05-05"]}},
                                              {"dataframe_records": [{"name": "Fi", "formal": "yes", "when": "2026-12-07"}]},
                                              {"dataframe_records": [{"name": "Gu", "formal": True, "when": "not a date"}]}]],
            "shapeless": ["dev.credit.shapeless", [{"dataframe_records": [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]},
                                                  {"dataframe_split": {"columns": ["a"], "data": [[1], [2], [3]]}},
                                                  {"instances": [{"a": 1}]}, {"inputs": {"a": [1, 2]}}, {"dataframe_records": [{"b": "x"}]}]]}


class Lister(mlflow.pyfunc.PythonModel):
    "A model of an array column: each row's sum."
    def predict(self, context, model_input, params=None): return [float(sum(v)) for v in model_input["values"]]


class Weigher(mlflow.pyfunc.PythonModel):
    "A model of 32-bit columns (MLflow's integer and float): count times weight."
    def predict(self, context, model_input, params=None):
        return (model_input["count"].astype("float64") * model_input["weight"].astype("float64")).tolist()


def typed_models(ws) -> dict:
    "Two kinds more: an array column, and MLflow's 32-bit integer and float columns."
    import pandas as pd
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array
    ws.world.use_mlflow()
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="m", python_model=Lister(), registered_model_name="dev.credit.lister", pip_requirements=["mlflow"],
                                signature=mlflow.models.ModelSignature(inputs=Schema([ColSpec(Array(DataType.double), "values")]),
                                                                       outputs=Schema([ColSpec("double")])))
        log_baseline(pd.DataFrame({"values": [[1.0, 2.5], [3.0]]}), [3.5, 3.0])  # arrays: compared by their labels
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="m", python_model=Weigher(), registered_model_name="dev.credit.weigher", pip_requirements=["mlflow"],
                                signature=mlflow.models.ModelSignature(inputs=Schema([ColSpec("integer", "count"), ColSpec("float", "weight")]),
                                                                       outputs=Schema([ColSpec("double")])))
        log_baseline(pd.DataFrame({"count": [1, 3], "weight": [0.5, 2.0]}), [0.5, 6.0])
    return {"lister": ["dev.credit.lister", [{"dataframe_records": [{"values": [1.0, 2.5]}, {"values": []}]},
                                            {"inputs": {"values": [[3.0, 4.0]]}}, {"dataframe_records": [{"values": "x"}]}]],
            "weigher": ["dev.credit.weigher", [{"dataframe_records": [{"count": 3, "weight": 0.5}]},
                                              {"dataframe_split": {"columns": ["count", "weight"], "data": [[2, 1.25]]}},
                                              {"inputs": {"count": [4], "weight": [2.0]}},
                                              {"dataframe_records": [{"count": 2.5, "weight": 1.0}]}]]}


@pytest.fixture(scope="module")
def unlike(ws):
    return {**log_models(ws), **more_models(ws), **typed_models(ws)}


def same(a, b) -> bool:
    "Two answers equal, floats within 1e-9 at any depth."
    if isinstance(a, float) and isinstance(b, float): return abs(a - b) <= 1e-9 or a == b
    if isinstance(a, list) and isinstance(b, list): return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict): return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def test_models_unlike_the_demos_get_the_answers_mlflows_scoring_server_gives(ws, unlike):
    """Issue 30's conformance set: text and integer columns, a DataFrame answer with text in it, params, a tensor signature, a regressor
    with an optional input, a multiclass classifier of text labels, text/boolean/datetime inputs answered with text, a dict answer,
    an array column, MLflow's 32-bit integer and float columns (with the demo's feature-store model,
    tests/test_serving.py, eleven kinds); each request sent to the runtime over HTTP and to MLflow's own scoring server in process:
    the same status, the same predictions (floats within 1e-9), or the same error code."""
    import pandas as pd
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient
    from served import create, invoke
    from databricks.sdk.service.serving import AiGatewayConfig, AiGatewayInferenceTableConfig, ServedEntityInput
    differences, captured = [], {}
    for name, (model, requests) in unlike.items():
        start, answered = pd.Timestamp.now(tz="UTC"), []
        create(ws, name, ServedEntityInput(entity_name=model, entity_version="1"),
               ai_gateway=AiGatewayConfig(inference_table_config=AiGatewayInferenceTableConfig(
                   catalog_name="dev", schema_name="credit", table_name_prefix=name, enabled=True)))
        try:
            with TestClient(scoring_server.init(mlflow.pyfunc.load_model(f"models:/{model}/1"))) as mlflow_server:
                for request in requests:
                    theirs, ours = mlflow_server.post("/invocations", json=request), invoke(ws, name, request)
                    if ours.status_code == 200: answered.append(ours.json()["predictions"])
                    if theirs.status_code == 200 and ours.status_code == 200:
                        if not same(ours.json()["predictions"], theirs.json()["predictions"]): differences.append((name, request, ours.text, theirs.text))
                    elif (ours.status_code, ours.json().get("error_code")) != (theirs.status_code, theirs.json().get("error_code")):
                        differences.append((name, request, ours.status_code, ours.text[:300], theirs.status_code, theirs.text[:300]))
            end = pd.Timestamp.now(tz="UTC")  # (the endpoint tests below send requests of their own)
            if name not in ("summer", "shapeless", "lister", "weigher"):  # endpoint tests: any model with a column signature and an input example
                report = endpoint_tests(dataclasses.replace(ws.env, variables={**ws.env.variables, "model_name": model}), "1", name,
                                        requests=3, client=ws.w)
                assert [c for c, ok, _ in report.checks if not ok and c != "latency"] == [], report.summary()
                assert [c for c, _, _ in report.checks] == ["schema", "golden_sample", "latency", "error_rate"], report.summary()
            if name != "summer": captured[name] = start, end, answered, requests  # a tensor model's rows have no names
        finally:
            ws.w.serving_endpoints.delete(name)
    assert differences == [], "\n".join(map(repr, differences))
    monitored = {name: monitor_captured(ws, name, *window) for name, window in captured.items()}  # (tables stay)
    # issue 30: what each endpoint answered is read back from its inference table, whatever its inputs' types; answers
    # that are not one value per row (a DataFrame's records, a dict) are left out, each with its reason
    assert {n: m[0] for n, m in monitored.items()} == {n: m[1] for n, m in monitored.items()}, monitored
    assert {n for n, m in monitored.items() if m[2]} == {"labeller", "shapeless"}, monitored
    why = {n: {w.split(": ", 1)[1].split(":")[0] for _, w in m[2]} for n, m in monitored.items() if m[2]}
    assert why == {"labeller": {"the response's predictions are not one value per row"},  # records
                   "shapeless": {"the response has no predictions (a list of values)"}}, why  # a dict
    # each model's drift check, as `monitor` runs it: text, booleans, arrays and labels as categories, times left out and named
    kinds = {n: dict(zip(m[3].results.feature, m[3].results.kind)) for n, m in monitored.items() if hasattr(m[3], "results")}
    assert kinds == {"colours": {"colour": "categorical", "n": "numeric", "prediction": "numeric"},  # 0 and 1
                     "regressor": {"x": "numeric", "y": "numeric", "prediction": "numeric"},
                     "multiclass": {"x": "numeric", "prediction": "categorical"},
                     "greeter": {"name": "categorical", "formal": "categorical", "prediction": "categorical"},
                     "lister": {"values": "categorical", "prediction": "numeric"},
                     "weigher": {"count": "numeric", "weight": "numeric", "prediction": "numeric"}}, kinds
    for n in ("labeller", "shapeless"):
        assert "can be read as rows matching their predictions, e.g. request " in str(monitored[n][3]), monitored[n][3]
        assert "predictions are not one value per row" in str(monitored[n][3]) or "has no predictions" in str(monitored[n][3])
    assert monitored["greeter"][3].skipped == {"1": {"when": "datetime64[ns] values: drift is measured on numbers and categories"}}
    # a model without a signature: Unity Catalog refuses to register one, so Model Serving never loads one; the runtime says why
    from databricks.sdk.errors import OperationFailed
    with pytest.raises(OperationFailed, match="UPDATE_FAILED"):
        create(ws, "unsigned", ServedEntityInput(entity_name="dev.credit.unsigned", entity_version="1"))
    try: assert "has no input signature" in ws.w.serving_endpoints.get("unsigned").state.as_dict().get("config_update", "") or \
                "has no input signature" in str(ws.w.serving_endpoints.get("unsigned").as_dict())
    finally: ws.w.serving_endpoints.delete("unsigned")


def monitor_captured(ws, name, start, end, answered, requests):
    """What monitoring reads of endpoint `name`'s inference table from `start` to `end`: (rows read, rows of its
    one-value-per-row answers, the requests left out with why, the drift rows of `monitor`'s check when the model logged a
    baseline). The runtime writes the table in batches: the rows are waited for."""
    import time
    from serving_mlops.monitoring.checks import run_monitoring
    from serving_mlops.monitoring.inference import inference_frame, read_payload
    from serving_mlops.monitoring.requests import MonitoringError
    deadline, got = time.monotonic() + 60, None
    while (got is None or got.num_rows < len(requests)) and time.monotonic() < deadline:
        try: got = read_payload(ws.env, name, start, end)
        except MonitoringError: time.sleep(0.2)  # the table's first batch is not written yet
        else: time.sleep(0 if got.num_rows >= len(requests) else 0.2)
    assert got is not None and got.num_rows == len(requests), (name, got and got.num_rows, len(requests))
    frame = inference_frame(ws.env, got, endpoint=name)
    plain = sum(len(p) for p in answered if isinstance(p, list) and not any(isinstance(v, (dict, list)) for v in p))
    # what `monitor` runs (it never raises the alert itself: found drift is in the results); a window none of whose
    # requests can be read ends with an error naming why (`monitor` exits 1), not a crash
    try: drift = run_monitoring(ws.env, name, start.isoformat(), end.isoformat(), 60, None, "", "drift", 0).drift
    except MonitoringError as e: drift = e
    return len(frame), plain, frame.attrs["unreadable"], drift


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
