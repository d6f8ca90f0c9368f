"""Random invocation bodies in the four formats (hypothesis strategies), shared by the fuzz of the runtime over HTTP
(test_reliability_invocations) and the contract between the runtime's parser and monitoring's (test_drift_scale)."""
import json
import re

from hypothesis import strategies as st

from serving_mlops.domains import FEATURE_DOMAINS

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


def mutate_inner(body: bytes) -> bytes:
    "`body` with the first key of its first record given twice, the first time as null."
    return re.sub(rb'\[\{("(?:[^"\\]|\\.)*"): ', lambda m: b"[{" + m.group(1) + b": null, " + m.group(1) + b": ", body, count=1)
