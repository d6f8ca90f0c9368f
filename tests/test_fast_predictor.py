"The tree compiler of the serving runtime: the scikit-learn pipeline's own probabilities on rows it never saw, and a fallback when it cannot be exact."
import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from serving_mlops.data import LABEL_COLUMN, generate_credit_data
from serving_mlops.serving.compiled import compile_pipeline, compile_trees, verified
from serving_mlops.train import make_pipeline


@pytest.fixture(scope="module")
def trained():
    "A HistGradientBoosting pipeline trained as the project trains one, on synthetic clients in the UCI schema."
    df = generate_credit_data(4000, seed=5).rename(columns={"SEX": "sex", "EDUCATION": "education_level", "MARRIAGE": "marital_status"})
    columns = [c for c in df.columns if c not in ("ID", LABEL_COLUMN)]
    X = df[columns].astype(float).mask(np.random.default_rng(5).random((len(df), len(columns))) < 0.05)  # missing values in training too
    return make_pipeline(columns, max_leaf_nodes=40, max_iter=120).fit(X, df[LABEL_COLUMN]), columns, X


def random_rows(X: pd.DataFrame, n: int, seed: int) -> np.ndarray:
    "Rows drawn from `X`'s columns, with missing values, unseen categories and values far out of the training range."
    rng = np.random.default_rng(seed)
    A = X.to_numpy()[rng.integers(0, len(X), n)]
    A = np.where(rng.random(A.shape) < 0.2, np.nan, A)
    far = rng.random(A.shape) < 0.1
    return np.where(far, rng.choice([-1e9, -7.0, 1e9, 123456.5], size=A.shape), A)


def test_compiled_trees_equal_predict_proba(trained):
    pipeline, columns, X = trained
    fast = verified(compile_pipeline(pipeline, columns), pipeline, columns, X.head(5))
    assert fast is not None
    rows = random_rows(X, 3000, seed=11)
    want = pipeline.predict_proba(pd.DataFrame(rows, columns=columns))[:, 1]
    sizes = [1, 2, 7, 16, 64, 128, 129, 300, 1, 300]
    got = np.concatenate([fast(rows[i:i + s]) for i, s in zip(range(0, 3000, 300), sizes)])
    want = np.concatenate([want[i:i + s] for i, s in zip(range(0, 3000, 300), sizes)])
    assert np.abs(got - want).max() <= 1e-12  # one row, small batches (numpy walk) and large ones (scikit-learn's loop)
    assert np.isnan(rows).any() and (np.abs(rows) >= 1e9).any()


def test_unverifiable_predictor_falls_back(trained):
    pipeline, columns, X = trained
    estimator = pipeline.steps[-1][1]
    trees = compile_trees(estimator)
    nudged = lambda A: trees(A) * (1 + 1e-9)  # a predictor off by a hair is refused
    prep = lambda X: pipeline[:-1].transform(pd.DataFrame(X, columns=columns))
    assert verified(lambda X: trees(prep(X)), pipeline, columns, X.head(5)) is not None
    assert verified(lambda X: nudged(prep(X)), pipeline, columns, X.head(5)) is None
    assert verified(lambda X: 1 / 0, pipeline, columns, X.head(5)) is None  # one that raises too


def test_categorical_splits_are_not_compiled():
    rng = np.random.default_rng(3)
    X = np.column_stack([rng.integers(0, 6, 800), rng.normal(size=800)]).astype(float)
    y = ((X[:, 0] % 2 == 0) ^ (X[:, 1] > 0)).astype(int)
    model = HistGradientBoostingClassifier(max_iter=20, categorical_features=[0]).fit(X, y)
    assert compile_trees(model) is None  # categorical bitsets: scikit-learn predicts
    assert compile_trees(HistGradientBoostingClassifier(max_iter=5).fit(X, np.arange(800) % 3)) is None  # multi-class
