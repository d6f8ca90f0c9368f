"""Issue 14, drift at scale: `parse_requests` (DuckDB's JSON reader) gives the same rows as the orjson loop it replaced
(benchmarks/reference_parse.py), and so the same drift statistics, on a small window with all four payload formats, keys-only
and feature requests, nulls, error responses, rows not logged and keys no feature table knows."""
import re
import sys
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from reference_parse import reference_parse_requests  # noqa: E402

from serving_mlops.drift import feature_drift, training_baseline  # noqa: E402
from serving_mlops.monitoring.inference import payload_rows  # noqa: E402
from serving_mlops.monitoring.requests import parse_requests

COLUMNS = ["age", "limit", "sex"]
ENTITY, KEYS_ENTITY = "e-features", "e-keys"


def window() -> pa.Table:
    "Requests in every format, one to three rows each, features or keys (known and unknown ids), nulls, errors, one not logged."
    rng = np.random.default_rng(5)
    X = pd.DataFrame({"age": rng.integers(20, 70, 60).astype(float), "limit": rng.gamma(2, 5e4, 60), "sex": rng.integers(1, 3, 60)})
    X.loc[[3, 17], "age"] = np.nan
    bodies = []
    for i in range(0, 60, 3):
        rows = X.iloc[i:i + 1 + i % 3]
        records = [{c: (None if pd.isna(v) else v) for c, v in r.items()} for r in rows.to_dict("records")]
        kind = (i // 3) % 6
        if kind == 0: body = {"dataframe_split": {"columns": COLUMNS, "data": [list(r.values()) for r in records]}}
        elif kind == 1: body = {"dataframe_records": records}
        elif kind == 2: body = {"instances": [list(r.values()) for r in records]}  # rows in the model's column order
        elif kind == 3: body = {"inputs": {c: [r[c] for r in records] for c in COLUMNS}}  # columns of values
        elif kind == 4: body = {"instances": records}
        else: body = {"inputs": [list(r.values()) for r in records]}
        bodies.append((ENTITY, body, len(rows)))
    for i, customer in enumerate([1, 2, 999_999, 3, 4]):  # keys only; 999,999 is known to no feature table
        body = ({"dataframe_records": [{"customer_id": customer, "snapshot_date": "2026-01-05"}]} if i % 2 else
                {"dataframe_split": {"columns": ["customer_id", "snapshot_date"], "data": [[customer, "2026-01-05"], [customer + 10, None]]}})
        bodies.append((KEYS_ENTITY, body, 1 if i % 2 else 2))
    n = len(bodies)
    rng = np.random.default_rng(1)
    status = np.where(np.arange(n) % 7 == 3, 400, 200)
    response = [orjson.dumps({"predictions": rng.random(k).round(6).tolist()}).decode() if s == 200 else
                '{"error_code": "BAD_REQUEST", "message": "no"}' for (_, _, k), s in zip(bodies, status)]
    table = payload_rows(pd.DataFrame({"x": np.zeros(n)}), np.zeros(n), ENTITY, "2026-01-05 10:00", 600).to_pandas()
    table["request"] = [orjson.dumps(b).decode() for _, b, _ in bodies]
    table["response"], table["status_code"], table["served_entity_id"] = response, status.astype("int32"), [e for e, _, _ in bodies]
    table.loc[5, "response"] = None  # not logged in full
    return pa.Table.from_pandas(table, preserve_index=False)


def same_rows(new: pd.DataFrame, old: pd.DataFrame):
    "The same prediction rows with the same values (numbers compared as numbers: the new path keeps model inputs as float64)."
    assert len(new) == len(old) and new.attrs["not_logged"] == old.attrs["not_logged"]
    assert sorted(new.columns) == sorted(old.columns)
    for c in old.columns:
        a, b = new[c], old[c]
        if c == "_sent": assert [set(s.split(",")) for s in a] == [set(s.split(",")) for s in b], c
        elif pd.api.types.is_numeric_dtype(b) or b.isna().all():
            np.testing.assert_array_equal(a.to_numpy("float64", na_value=np.nan), b.to_numpy("float64", na_value=np.nan), err_msg=c)
        else: assert a.tolist() == b.tolist(), c


def test_every_format_gives_the_reference_rows_and_statistics():
    payload, columns = window(), {ENTITY: COLUMNS, KEYS_ENTITY: ["age", "limit", "sex"]}
    new, old = parse_requests(payload, columns), reference_parse_requests(payload, columns)
    same_rows(new, old)
    assert new.attrs["not_logged"] == 1
    keys = new[new.served_entity_id == KEYS_ENTITY]
    assert keys.customer_id.dtype == old.customer_id.dtype and keys.customer_id.tolist() == old[old.served_entity_id == KEYS_ENTITY].customer_id.tolist()
    alone = parse_requests(payload.filter(pa.compute.equal(payload.column("served_entity_id"), KEYS_ENTITY)), columns)
    assert alone.customer_id.dtype == "int64" and alone.snapshot_date.dtype == object  # keys keep their JSON type, for the lookup join
    assert 999_999 in set(keys.customer_id) and keys.snapshot_date.isna().any()
    features = new[new.served_entity_id == ENTITY]
    reference = old[old.served_entity_id == ENTITY]
    assert features.age.isna().sum() == reference.age.isna().sum() > 0
    rng = np.random.default_rng(0)
    baseline = training_baseline(pd.DataFrame({"age": rng.integers(18, 80, 500).astype(float), "limit": rng.gamma(2, 4e4, 500),
                                               "sex": rng.integers(1, 3, 500), "prediction": rng.random(500)}), ["sex"], prediction="prediction")
    for large_sample in (5_000, 20):  # all rows, and the sampled tests
        a, b = feature_drift(baseline, features, 0.2, 0.01, large_sample), feature_drift(baseline, reference, 0.2, 0.01, large_sample)
        pd.testing.assert_frame_equal(a, b)


def test_the_same_large_window_as_the_reference():
    from serving_mlops.data import FEATURE_COLUMNS, generate_credit_data
    X = generate_credit_data(3_000, seed=2, drift=0.5, labelled=False)[FEATURE_COLUMNS].astype("float64")
    X.iloc[::97, 4] = np.nan
    payload = payload_rows(X, np.random.default_rng(0).random(len(X)), ENTITY, "2026-01-05 10:00", rows_per_request=2, error_share=0.02)
    for columns in ({ENTITY: FEATURE_COLUMNS}, {}):  # the model's columns known (numbers as parsed), or not (every value typed)
        pd.testing.assert_frame_equal(parse_requests(payload, columns), reference_parse_requests(payload, columns))


@pytest.mark.parametrize("request_, response, message", [
    ('{"dataframe_split": {"columns": ["age"], "data": [[1.0]]', '{"predictions": [0.1]}', "not valid JSON"),
    ('{"rows": [[1.0]]}', '{"predictions": [0.1]}', "none of dataframe_split"),
    ('{"dataframe_split": {"columns": ["age", "limit"], "data": [[1.0]]}}', '{"predictions": [0.1]}', "expected 2 (one per column)"),
    ('{"dataframe_split": {"columns": [], "data": [[]]}}', '{"predictions": [0.1]}', "could not be read as rows of columns"),
    ('{"dataframe_split": {"columns": ["age"], "data": [["old"]]}}', '{"predictions": [0.1]}', "column 'age' has a value that is not a number"),
    ('{"instances": [[1.0, 2.0]]}', '{"predictions": [0.1]}', "has 2 values; the model takes 3"),
    ('{"inputs": {"age": [1.0, 2.0], "limit": [3.0]}}', '{"predictions": [0.1, 0.2]}', "different lengths"),
    ('{"dataframe_records": [{"age": 1.0}]}', '{"predictions": [0.1, 0.2]}', "1 rows but 2 predictions"),
    ('{"dataframe_records": [{"age": 1.0}]}', '{"predictions": ["high"]}', "predictions are not numbers"),
    ('{"dataframe_records": [{"age": 1.0}]}', '{"answer": [0.1]}', "the response has no predictions"),
])
def test_a_request_that_cannot_be_read_is_left_out_by_id_and_the_rest_is_read(request_, response, message):
    "Issue 28: a request the endpoint answered 200 never fails the window; it is left out, named by its id with why."
    payload = payload_rows(pd.DataFrame({"age": [1.0, 2.0]}), [0.1, 0.2], ENTITY, "2026-01-05 10:00").to_pandas()
    payload.loc[1, "request"], payload.loc[1, "response"] = request_, response
    read = parse_requests(payload, {ENTITY: COLUMNS})
    (request_id, why), = read.attrs["unreadable"]
    assert request_id == payload.databricks_request_id[1] and re.match(f"request {request_id}: .*{re.escape(message)}", why), why
    assert read.databricks_request_id.tolist() == [payload.databricks_request_id[0]] and read.age.tolist() == [1.0]


# --- what the endpoint answers, monitoring reads (issue 28, item 2) ---------------------------------------------------

def _door_spec():
    "The credit model's input spec as the runtime builds it: features, the key customer_id (an integer), snapshot_date passed through."
    from bodies import KNOWN
    from serving_mlops.domains import FEATURE_DOMAINS
    from serving_mlops.serving.protocol import InputSpec
    columns = KNOWN[2:]  # the feature tables' columns
    return InputSpec(columns, ["customer_id"], ["snapshot_date"], {c: FEATURE_DOMAINS[c] for c in [*columns, "customer_id", "snapshot_date"]},
                     {"customer_id": "integer"})


def _window_of(bodies: list, rows: list) -> pd.DataFrame:
    "Inference table rows of `bodies` answered 200 with one prediction per row."
    n = len(bodies)
    table = payload_rows(pd.DataFrame({"x": np.zeros(n)}), np.zeros(n), ENTITY, "2026-01-05 10:00", 600).to_pandas()
    table["request"] = [b.decode() for b in bodies]
    table["response"] = [orjson.dumps({"predictions": [0.25] * k}).decode() for k in rows]
    return table


def _same_values(read: pd.DataFrame, parsed: list):
    "The rows monitoring read are the rows the runtime parsed, request by request, column by column (numbers as numbers)."
    for (request_id, columns), (_, got) in zip(parsed, read.groupby("databricks_request_id", sort=False)):
        assert got.databricks_request_id.iloc[0] == request_id
        for c, values in columns.items():
            expected = pd.Series(values, dtype=object)
            np.testing.assert_array_equal(got[c].isna().to_numpy(), expected.isna().to_numpy(), err_msg=f"{request_id} {c}")
            seen, want = got[c][~expected.isna().to_numpy()].tolist(), expected.dropna().tolist()
            assert seen == want if c == "snapshot_date" else np.allclose(np.asarray(seen, float), np.asarray(want, float), rtol=0, atol=0), (c, seen, want)


@pytest.mark.parametrize("body, accepted", [
    (b'{"dataframe_records": [{"customer_id": 7, "customer_id": 8}]}', False),  # a key repeated inside a record
    (b'{"dataframe_records": [{"customer_id": 7}], "dataframe_records": [{"customer_id": 8}]}', False),  # a repeated payload key
    (b'{"inputs": {"customer_id": [7], "customer_id": [8]}}', False),
    (b'{"dataframe_records": [{}, {"customer_id": 7, "snapshot_date": "2026-01-05"}]}', False),  # {}: a null key
    (b'{"instances": [{}, {"customer_id": 7, "snapshot_date": "2026-01-05"}]}', False),
    (b'{"dataframe_records": [{"customer_id": 7}, {"customer_id": 8, "age": 30}]}', True),  # a column some rows lack: null there
])
def test_each_request_shape_is_refused_at_the_door_or_monitored(body, accepted):
    "Decided once (docs/serving.md, 'Where this runtime differs from MLflow'): what the runtime answers, monitoring reads as it was scored."
    from serving_mlops.serving.protocol import ServingError, parse_request
    spec = _door_spec()
    try: parsed = parse_request(body, spec)
    except ServingError as e:
        assert not accepted and e.status == 400, e
        return
    assert accepted
    read = parse_requests(_window_of([body], [parsed.rows]), {ENTITY: spec.columns})
    assert read.attrs["unreadable"] == [] and len(read) == parsed.rows
    _same_values(read, [(read.databricks_request_id.iloc[0], parsed.columns)])


def test_empty_records_beside_full_ones_are_rows_of_nulls():
    "For a model without lookup keys `[{}, {...}]` is scored (a row of nulls, as MLflow's pandas reads it): monitoring reads both rows."
    from serving_mlops.serving.protocol import InputSpec, parse_request
    body = b'{"dataframe_records": [{}, {"age": 30, "limit": 5, "sex": 1}]}'
    parsed = parse_request(body, InputSpec(columns=COLUMNS))
    read = parse_requests(_window_of([body], [parsed.rows]), {ENTITY: COLUMNS})
    assert read.attrs["unreadable"] == [] and len(read) == 2 and read.age.isna().tolist() == [True, False] and read.prediction.tolist() == [0.25] * 2


def test_whatever_the_runtime_accepts_monitoring_reads_with_the_values_it_scored():
    "Fuzzed bodies in the four formats (the HTTP fuzz's strategies), in windows of 50: every body the runtime's parser accepts is read by monitoring, none left out, the same values."
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from bodies import encode, extras, mutate, mutate_inner, payloads
    from serving_mlops.serving.protocol import ServingError, parse_request
    spec, counts = _door_spec(), {"accepted": 0, "refused": 0}

    @settings(max_examples=16, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(payloads, extras, st.integers(0, 5), st.sampled_from(["none"] * 6 + ["dup", "inner"])), min_size=50, max_size=50))
    def monitoring_reads_what_was_accepted(drawn):
        bodies, rows, parsed = [], [], []
        for payload, extra, where, mutation in drawn:
            body = encode(payload, extra, 0, where)
            body = mutate(body, payload) if mutation == "dup" else mutate_inner(body) if mutation == "inner" else body
            try: request = parse_request(body, spec)
            except ServingError: counts["refused"] += 1; continue
            counts["accepted"] += 1
            bodies.append(body); rows.append(request.rows); parsed.append(request.columns)
        if not bodies: return
        window = _window_of(bodies, rows)
        read = parse_requests(window, {ENTITY: spec.columns})
        assert read.attrs["unreadable"] == [], read.attrs["unreadable"][:3]
        assert len(read) == sum(rows)
        _same_values(read, list(zip(window.databricks_request_id, parsed)))

    monitoring_reads_what_was_accepted()
    print(f"contract: {counts}")
    assert counts["accepted"] > 100 and counts["refused"] > 100  # both kinds were tried
