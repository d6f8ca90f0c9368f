"""Change is the everyday job: the model swapped for another estimator, as docs/training-and-registry.md's how-to does it.

The module serves the session's trained world (tests/served.py) in a runtime of its own; each swapped model is trained
through `train` with the how-to's two replacements (the pipeline and its search space), registered without moving an
alias (the world's aliases belong to the other modules), deployed to an endpoint of its own and tested as the deploy job
tests every version: schema, golden sample, keys only in both callers' formats compared with the in-process model.
"""
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
