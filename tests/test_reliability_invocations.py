"""Reliability of invocations (issue 16, the data plane), against the runtime as a separate process over HTTP.

One bad request fails only itself: whatever can fail for one request (params, parsing, lookups,
serialisation) is refused before it joins a micro-batch, and a batched model call that raises is
retried member by member. Types and ranges are checked at the door: keys against the feature
tables' key type, feature values against the domains ingest applies (`serving_mlops.domains`),
dates as `YYYY-MM-DD`, column names once each. A fuzz of invocation bodies in the four formats
finds no answer >= 500.
"""
import json
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from databricks.sdk.service.serving import ServedEntityInput
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving_mlops.domains import FEATURE_DOMAINS
from serving_mlops.serving.process import server_info

from served import create, entity, in_process, invoke, key  # noqa: E402


DEEP_PARAMS = b'{"dataframe_records": [{"customer_id": 1}], "params": {"p": ' + b"[" * 300 + b"]" * 300 + b"}}"  # finding 3


@pytest.fixture(scope="module")
def door(ws):
    "An endpoint serving the credit model, and the in-process predictions of the first 200 clients by key."
    create(ws, "door", entity(ws, ws.v1))
    cids = list(range(1, 201))
    rows = [ws.features(cid) for cid in cids]
    return {"name": "door", "rows": dict(zip(cids, rows)), "expected": dict(zip(cids, in_process(ws, rows)))}


def refused(r, *words):
    "Assert `r` is a 400 BAD_REQUEST whose message has every one of `words`."
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    assert body["error_code"] in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE"), body
    assert all(w in body["message"] for w in words), (words, body["message"])


def test_finding_6_keys_beyond_64_bits_and_non_string_columns_are_400(ws, door):
    with httpx.Client() as client:
        for big in (2**63, 2**64 - 1):  # orjson reads both as integers; SQLite raised OverflowError (500)
            refused(invoke(ws, "door", {"dataframe_records": [key(1), key(big)]}, client),
                    "key column 'customer_id' row 1", "outside the 64-bit integers")
        for big in (b"18446744073709551616", b"-9223372036854775809"):  # beyond 64 bits JSON reads them as floats
            refused(invoke(ws, "door", b'{"inputs": {"customer_id": [' + big + b"]}}", client),
                    "key column 'customer_id' row 0: expected an integer")
        for column in (["age"], {"a": 1}, 3, None):
            refused(invoke(ws, "door", {"dataframe_split": {"columns": ["customer_id", column], "data": [[1, 30]]}}, client),
                    "dataframe_split.columns[1]", "expected a column name (string)")
        ok = invoke(ws, "door", {"dataframe_records": [key(2**62)]}, client)  # a 64-bit key that is just unknown
        assert ok.status_code == 200 and ok.json()["metadata"]["keys_not_found"][0]["key"] == [2**62]


def test_finding_8_loose_types_and_values_ingest_would_quarantine_are_400(ws, door):
    with httpx.Client() as client:
        for wrong in ("1", " 1", "01", "1.0", "not-a-number", 1.0, True, [1], {"id": 1}):  # each resolved to client 1 or was imputed
            refused(invoke(ws, "door", {"dataframe_records": [key(wrong)]}, client),
                    "key column 'customer_id' row 0: expected an integer", "key type")
        refused(invoke(ws, "door", {"inputs": {"customer_id": [1, 0]}}, client), "column 'customer_id' row 1: 0 is not at least 1")
        for column, value, expected in [("age", -1, "is outside 18..100"), ("age", 1e308, "is outside 18..100"),
                                        ("age", 35.5, "is not a whole number"), ("sex", 7, "is not one of 1, 2"),
                                        ("education_level", 99, "is not one of 1, 2, 3, 4"),
                                        ("marital_status", 0, "is not one of 1, 2, 3"), ("limit_balance", 0, "is not at least 1"),
                                        ("pay_ratio_1m", 1.5, "is outside 0..1"), ("recent_delay", 9, "is outside 0..8")]:
            rows = [key(3), {"customer_id": 4, column: value}]
            refused(invoke(ws, "door", {"dataframe_records": rows}, client), f"column '{column}' row 1: {value!r} {expected}")
            full = {c: door["rows"][4][c] for c in ws.columns}  # the same value among all the features, as instances
            refused(invoke(ws, "door", {"instances": [[{**full, column: value}[c] for c in ws.columns]]}, client),
                    f"column '{column}' row 0")
        refused(invoke(ws, "door", {"dataframe_split": {"columns": ["customer_id", "age", "age"], "data": [[1, 30, 40]]}}, client),
                "dataframe_split.columns[2] repeats column 'age'")
        for date in (20051001, "20051001", "2005-13-01", "2005-10-01T00:00:00", True, ["2005-10-01"], {"d": 1}):
            refused(invoke(ws, "door", {"dataframe_records": [{"customer_id": 1, "snapshot_date": date}]}, client),
                    "column 'snapshot_date' row 0: expected a date as text YYYY-MM-DD")
        r = invoke(ws, "door", {"dataframe_records": [{"customer_id": 1, "snapshot_date": "2005-10-01"}, {"customer_id": 2, "snapshot_date": None}]}, client)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["predictions"], [door["expected"][1], door["expected"][2]], rtol=0, atol=1e-12)
        r = invoke(ws, "door", {"dataframe_records": [key(5, age=18.0, sex=2, education_level=4)]}, client)
        assert r.status_code == 200  # the edges of the domains, integral floats included, are accepted
        np.testing.assert_allclose(r.json()["predictions"], in_process(ws, [{**door["rows"][5], "age": 18.0, "sex": 2.0, "education_level": 4.0}]),
                                   rtol=0, atol=1e-12)


POISON = [  # (body, words of the 400 message)
    (DEEP_PARAMS, ["params cannot be passed to a model"]),
    (json.dumps({"dataframe_records": [key(2**63)]}).encode(), ["key column 'customer_id' row 0"]),
    (json.dumps({"dataframe_records": [key("1")]}).encode(), ["key column 'customer_id' row 0"]),
    (json.dumps({"dataframe_split": {"columns": [["customer_id"]], "data": [[1]]}}).encode(), ["dataframe_split.columns[0]"]),
    (json.dumps({"dataframe_records": [{"customer_id": 1, "age": -1}]}).encode(), ["column 'age' row 0"]),
    (b'{"dataframe_records": [{"customer_id": 1}], "client_request_id": ' + b"[" * 1000 + b"]" * 1000 + b"}", ["client_request_id"]),
    (json.dumps({"dataframe_records": [key(1)], "params": {"temperature": 18446744073709551615}}).encode(), None),  # odd, harmless params
]


def test_bad_neighbours_fail_only_themselves(ws, door):
    "Valid requests concurrently with poisonous ones (finding 3: 10 of 300 valid requests alongside 300-deep params got 500)."
    create(ws, "door-exploding", ServedEntityInput(entity_name="dev.credit.exploding_model", entity_version="1"))
    rng = random.Random(16)
    jobs = [("valid", cid) for cid in rng.choices(list(door["expected"]), k=900)]
    jobs += [("full", cid) for cid in rng.choices(list(door["expected"]), k=150)]
    jobs += [("poison", i % len(POISON)) for i in range(210)]
    jobs += [("explode", x) for x in [1.5] * 150 + [-1.0] * 30]  # the model raises on negative x, failing its whole batch
    rng.shuffle(jobs)
    local = threading.local()

    def send(job):
        kind, arg = job
        client = local.__dict__.setdefault("client", httpx.Client())
        if kind == "valid": return job, invoke(ws, "door", {"dataframe_records": [key(arg)]}, client)
        if kind == "full": return job, invoke(ws, "door", {"dataframe_records": [{"customer_id": arg, **door["rows"][arg]}]}, client)
        if kind == "explode": return job, invoke(ws, "door-exploding", {"dataframe_records": [{"x": arg}]}, client)
        return job, invoke(ws, "door", POISON[arg][0], client)

    with ThreadPoolExecutor(16) as pool: answers = list(pool.map(send, jobs))
    failed = [(job, r.status_code, r.text[:200]) for job, r in answers if job[0] in ("valid", "full") and r.status_code != 200]
    assert failed == [], f"{len(failed)} valid requests failed: {failed[:5]}"
    for (kind, arg), r in answers:
        if kind in ("valid", "full"):
            np.testing.assert_allclose(r.json()["predictions"], [door["expected"][arg]], rtol=0, atol=1e-12)
        elif kind == "explode":
            if arg >= 0: assert (r.status_code, r.json()["predictions"]) == (200, [arg * 2]), r.text
            else: refused(r, "failed on this input: ValueError: x must be non-negative")
        else:
            body, words = POISON[arg]
            if words is None: assert r.status_code == 200, r.text
            else: refused(r, *words)
    assert invoke(ws, "door", {"dataframe_records": [key(1)]}).status_code == 200


# --- fuzz: random invocation bodies in the four formats --------------------------------------------------------------

KNOWN = ["customer_id", "snapshot_date"] + [c for c in FEATURE_DOMAINS if c not in ("customer_id", "snapshot_date")]
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=12) | st.sampled_from(["1", " 1", "01", "1.0", "2005-10-01", "2005-02-30", "NaN", "\u00e9\u20ac\U0001f600", ""]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)
odd = json_values | st.sampled_from([2**63, 2**64 - 1, -2**63 - 1, 10**30, 1e308, -0.0, -1, 0, 99])


def in_domain(column):
    "Values of `column` inside its domain (keys: clients of the workspace, and a few unknown)."
    d = FEATURE_DOMAINS[column]
    if column == "customer_id": return st.integers(1, 2_100)
    if d.kind == "date": return st.dates().map(str)
    if d.kind == "code": return st.sampled_from(d.allowed)
    lo, hi = (-1e6 if d.allowed[0] is None else d.allowed[0]), (1e6 if d.allowed[1] is None else d.allowed[1])
    return st.integers(lo, hi).flatmap(lambda i: st.sampled_from([i, float(i)])) if d.kind == "integer" else st.floats(lo, hi)


def cell_of(column):
    "Mostly values in the column's domain, so that the checks after the first are reached; sometimes null or anything."
    kinds = {"valid": in_domain(column), "null": st.none(), "odd": odd}
    return st.sampled_from(["valid"] * 17 + ["null", "odd", "odd"]).flatmap(kinds.__getitem__)


cell = {c: cell_of(c) for c in KNOWN}
rows = st.fixed_dictionaries({"customer_id": cell["customer_id"]}, optional={c: cell[c] for c in KNOWN[1:]})
names = st.sampled_from(KNOWN) | st.sampled_from(KNOWN) | st.text(max_size=8) | json_values
tensors = st.lists(st.lists(st.sampled_from([c for c in KNOWN[2:]]).flatmap(lambda c: cell[c]), min_size=len(KNOWN) - 3, max_size=len(KNOWN) - 1)
                   | st.lists(odd, max_size=3), max_size=3)
records = st.lists(rows | rows | st.dictionaries(names.filter(lambda n: isinstance(n, str)), odd, max_size=4) | json_values, max_size=4)
columnar = st.integers(0, 3).flatmap(lambda n: st.fixed_dictionaries(
    {"customer_id": st.lists(cell["customer_id"], min_size=n, max_size=n)},
    optional={c: st.lists(cell[c], min_size=n, max_size=n) | st.lists(odd, max_size=3) | odd for c in KNOWN[1:]}))
payloads = st.one_of(
    st.builds(lambda rs: {"dataframe_split": {"columns": list(dict.fromkeys(k for r in rs for k in r)), "data": [[r.get(k) for k in dict.fromkeys(k for r in rs for k in r)] for r in rs]}},
              st.lists(rows, min_size=1, max_size=3)),
    st.builds(lambda cols, data: {"dataframe_split": {"columns": cols, "data": data}}, st.lists(names, max_size=4),
              st.lists(st.lists(odd, max_size=4), max_size=3) | odd),
    st.builds(lambda r: {"dataframe_records": r}, records | odd),
    st.builds(lambda r: {"instances": r}, tensors | records | odd),
    st.builds(lambda c: {"inputs": c}, columnar | columnar | tensors | odd),
    st.dictionaries(st.sampled_from(["dataframe_split", "dataframe_records", "instances", "inputs", "params", "client_request_id", "x"]),
                    json_values, max_size=3),
)
extras = st.just({}) | st.just({}) | st.fixed_dictionaries({}, optional={
    "params": st.dictionaries(st.text(max_size=5), json_values, max_size=3) | json_values,
    "client_request_id": st.text(max_size=12) | json_values, "usage_context": json_values})


def encode(payload, extra, depth: int, where: int) -> bytes:
    "The body as JSON text (big integers kept; unicode escaped or not), one value nested `depth` levels deep when `depth`."
    if depth:
        key = ["params", "client_request_id", "usage_context"][where % 3]
        deep = "[" * depth + "1" + "]" * depth
        return json.dumps({**payload, **extra, key: "@@"}, ensure_ascii=where % 2 == 0).replace('"@@"', deep).encode()
    return json.dumps({**payload, **extra}, ensure_ascii=where % 2 == 0).encode()


def mutate(body: bytes, payload: dict) -> bytes:
    "`body` with its first key given twice, the first time as null (JSON readers keep the last)."
    return b'{' + json.dumps(next(iter(payload))).encode() + b": null, " + body[1:] if payload else body


def test_fuzzed_invocations_never_answer_5xx(ws, door):
    log = ws.env.root / "serving" / "server.log"
    tracebacks = log.read_text(errors="replace").count("Traceback")
    statuses, fives = Counter(), []
    client = httpx.Client()

    @settings(max_examples=5_000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(payloads, extras, st.sampled_from([0] * 12 + [300, 1_100]), st.integers(0, 5),
           st.sampled_from(["none", "none", "none", "dup"]))
    def body_is_never_a_server_error(payload, extra, depth, where, mutation):
        body = encode(payload, extra, depth, where)
        if mutation == "dup": body = mutate(body, payload)
        r = invoke(ws, "door", body, client)
        statuses[r.status_code] += 1
        if r.status_code >= 500: fives.append((body[:300], r.status_code, r.text[:300]))
        elif r.status_code == 200: assert all(p is None or isinstance(p, float) for p in r.json()["predictions"])
        else: assert r.json()["error_code"] in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE"), r.text

    try: body_is_never_a_server_error()
    finally: client.close()
    print(f"fuzz: {sum(statuses.values())} bodies, statuses {dict(statuses)}")
    assert fives == [], f"{len(fives)} answers >= 500, e.g. {fives[:3]}"
    assert sum(statuses.values()) >= 5_000 and statuses[200] > 0 and statuses[400] > 0
    assert log.read_text(errors="replace").count("Traceback") == tracebacks  # no unexpected exception was logged
    assert server_info(ws.env) is not None
    r = invoke(ws, "door", {"dataframe_records": [key(7)]})  # still serving, still right
    np.testing.assert_allclose(r.json()["predictions"], [door["expected"][7]], rtol=0, atol=1e-12)
