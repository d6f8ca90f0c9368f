"""The reference for `parse_requests`: the orjson loop that parsed inference table requests before DuckDB did (issue 14),
kept only for benchmarks/drift_job.py (today's path against the new one) and tests/test_drift_scale.py (same rows, same
statistics). Not part of the package."""
import gc
from itertools import chain

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

from serving_mlops.errors import MlopsError
from serving_mlops.monitoring.requests import MonitoringError
from serving_mlops.serving.protocol import PAYLOAD_KEYS, InputSpec, payload_columns

PARSE_CHUNK = 20_000  # requests parsed at a time


def _values(payload, column: str) -> np.ndarray:
    "A column of a pandas or Arrow frame as a numpy array."
    if isinstance(payload, pa.Table): return payload.column(column).to_numpy(zero_copy_only=False)
    return payload[column].to_numpy()

def _request_rows(body: str, columns: list, where: str) -> tuple[tuple, list]:
    "Column names and rows of a request body in any of the four payload formats (rows without names take `columns`)."
    payload = orjson.loads(body)
    key = next((k for k in PAYLOAD_KEYS if k in payload), None) if isinstance(payload, dict) else None
    if key is None: raise MonitoringError(f"{where}: the request has none of {', '.join(PAYLOAD_KEYS)}")
    data = payload[key]
    if key == "dataframe_split" and isinstance(data, dict) and isinstance(data.get("columns"), list) and isinstance(data.get("data"), list):
        return tuple(data["columns"]), data["data"]  # rows as sent (the endpoint accepted them): the common format, kept fast
    try: parsed = payload_columns(key, data, InputSpec(columns=columns))
    except MlopsError as e:
        hint = "" if columns else " (its model's input columns are unknown: rows without names cannot be read)"
        raise MonitoringError(f"{where}: {e}{hint}") from None
    return tuple(parsed), [list(row) for row in zip(*parsed.values())]

def _frames_of_chunk(ids, entities, requests, responses, columns: dict, offset: int) -> list[pd.DataFrame]:
    "Frames of the prediction rows of one chunk of logged successful requests, one per set of sent columns."
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        sent = [_request_rows(b, columns.get(e, []), f"request {i}") for i, e, b in zip(ids, entities, requests)]
        predictions = [orjson.loads(r)["predictions"] for r in responses]
    except (orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise MonitoringError(f"a successful request in this chunk (ids {ids[0]}..{ids[-1]}) has a malformed request or response: {e!r}") from None
    finally:
        if gc_was_enabled: gc.enable()
    counts = np.fromiter((len(rows) for _, rows in sent), dtype="int64", count=len(sent))
    bad = np.flatnonzero(counts != np.fromiter(map(len, predictions), dtype="int64", count=len(predictions)))
    if len(bad): raise MonitoringError(f"request {ids[bad[0]]}: {counts[bad[0]]} rows but {len(predictions[bad[0]])} predictions; expected one per row")
    groups: dict[tuple, list[int]] = {}
    for i, (names, _) in enumerate(sent): groups.setdefault(names, []).append(i)
    out = []
    for names, idx in groups.items():
        rows = list(chain.from_iterable(sent[i][1] for i in idx))
        try: frame = pd.DataFrame(rows, columns=list(names))
        except (ValueError, AssertionError): raise MonitoringError(f"requests {ids[idx[0]]}..: rows do not match their {len(names)} columns") from None
        try: frame["prediction"] = np.fromiter(chain.from_iterable(predictions[i] for i in idx), dtype="float64", count=len(frame))
        except (TypeError, ValueError): raise MonitoringError(f"requests {ids[idx[0]]}..: predictions are not numbers; expected one probability per row") from None
        frame["_request"] = np.repeat(np.asarray(idx) + offset, counts[idx])
        frame["_sent"] = ",".join(names)
        out.append(frame)
    return out

def reference_parse_requests(payload, # inference table rows (pandas or Arrow), e.g. from `read_payload`
                   columns: dict | None = None, # served_entity_id -> its model's input columns, for rows sent without names
                   ) -> pd.DataFrame:
    "One row per prediction of the successful requests logged in full: the columns sent, `prediction`, request time, served entity and request id."
    status, requests, responses = _values(payload, "status_code"), _values(payload, "request"), _values(payload, "response")
    ok = np.flatnonzero(status == 200)
    logged = ok[np.fromiter((q is not None and r is not None for q, r in zip(requests[ok], responses[ok])), dtype=bool, count=len(ok))]
    ids, entities = _values(payload, "databricks_request_id")[logged], _values(payload, "served_entity_id")[logged]
    frames = []
    for lo in range(0, len(logged), PARSE_CHUNK):
        part = slice(lo, lo + PARSE_CHUNK)
        frames += _frames_of_chunk(ids[part], entities[part], requests[logged[part]], responses[logged[part]], columns or {}, lo)
    if not frames:
        out = pd.DataFrame({"prediction": pd.Series(dtype="float64"), "_sent": pd.Series(dtype=object)})
        position = np.zeros(0, dtype="int64")
    else:
        out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        if len(frames) > 1: out = out.sort_values("_request", kind="stable", ignore_index=True)
        position = out.pop("_request").to_numpy()
    out["request_time"] = pd.to_datetime(_values(payload, "request_time")[logged][position], utc=True)
    out["served_entity_id"], out["databricks_request_id"] = entities[position], ids[position]
    out.attrs["not_logged"] = len(ok) - len(logged)
    return out
