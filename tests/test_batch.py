"""Batch scoring inside Spark: `score_batch` returns a plan that reads the feature tables and predicts in Spark's Python
workers (it never starts from rows collected to the driver), with the same numbers as the model's in-process `predict`;
`batch_inference` predicts and writes in one pass of Spark's Python workers, one row per key, in one commit."""
import contextlib
import io

import mlflow
import numpy as np
import pytest
from conftest import expensive

from serving_mlops.batch import batch_inference, scoring_keys
from serving_mlops.config import using_mlflow
from serving_mlops.feature_store import example_workspace
from serving_mlops.features import KEY
from serving_mlops.registry import register_challenger, registry_client
from serving_mlops.spark import get_spark
from serving_mlops.train import train

TOLERANCE = 1e-9


def plan(df) -> str:
    "The physical plan Spark prints for `df`."
    with contextlib.redirect_stdout(io.StringIO()) as out: df.explain()
    return out.getvalue()


def in_process(env, uri: str, rows):
    "The model's own predict on `rows` (a pandas frame of keys and features), in this process."
    with using_mlflow(env): return mlflow.pyfunc.load_model(uri).predict(rows)


@pytest.fixture(scope="module")
@expensive
def workspace(tmp_path_factory):
    "A throwaway workspace of 1,500 clients whose champion is a model trained on its features."
    env, fs = example_workspace(1_500, seed=8, spark=get_spark(), home=tmp_path_factory.mktemp("workspaces"))
    result = train(env, n_trials=1, seed=2, store=fs, progress=False)
    version = register_challenger(env, result)
    registry_client(env).set_registered_model_alias(env.var("model_name"), "champion", version.version)
    return env, fs, result.model_uri


def test_score_batch_predicts_in_spark_what_the_model_predicts_in_process(workspace):
    env, fs, uri = workspace
    keys = scoring_keys(env, env.table_name("silver_clients"), fs.spark).repartition(3)  # several workers and batches
    scored = fs.score_batch(uri, keys)
    assert type(scored).__name__ == "DataFrame" and scored.columns[-1] == "prediction"
    physical = plan(scored)
    assert "ArrowEvalPython" in physical, physical  # the pandas UDF of mlflow's spark_udf: the model runs in Python workers
    assert "FileScan parquet" in physical, physical  # straight from the Delta tables' files
    assert "LocalTableScan" not in physical and "ExistingRDD" not in physical, physical  # not a frame made of collected rows
    rows = scored.toPandas()  # the test collects, to compare
    assert len(rows) == 1_500 and rows.customer_id.is_unique
    expected = in_process(env, uri, rows.drop(columns="prediction"))
    assert np.abs(rows.prediction.to_numpy() - expected).max() <= TOLERANCE


def test_batch_inference_writes_one_prediction_per_key_from_the_executors(workspace):
    env, fs, uri = workspace
    target = env.table_name("predictions")
    killed = fs.tables.path(target) / "_staging" / "999999999-0123abcd" / "part"  # files of an earlier run killed before its commit
    killed.mkdir(parents=True)
    (killed / "part-0.parquet").write_bytes(b"PAR1")
    scores = batch_inference(env, store=fs, progress=False)
    assert list((fs.tables.path(target) / "_staging").iterdir()) == []  # the killed run's files and this run's staging are gone
    assert scores.rows == 1_500
    assert scores.table_version == fs.tables.version(target)
    written = fs.tables.read_pandas(target)
    assert len(written) == 1_500 and not written.duplicated(KEY).any()
    assert written.scored_at.dt.tz is not None and (written.model_version == int(scores.version)).all()
    # the stored predictions are the model's, predicted in process from the same features
    features = fs.score_batch(uri, fs.spark.createDataFrame(written[KEY])).drop("prediction").toPandas()
    merged = features.merge(written[[*KEY, "prediction"]], on=KEY)
    assert len(merged) == 1_500
    assert np.abs(merged.prediction.to_numpy() - in_process(env, uri, merged.drop(columns="prediction"))).max() <= TOLERANCE
