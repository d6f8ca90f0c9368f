"""Capture that survives torn writes, damaged bytes, a lost position and a full disk (issue 16, finding 2).

Unit level: a real InferenceLog writing to a real Delta table in tmp_path; failures are made at the OS level (bytes cut or
changed in a segment, `os.unlink` refusing, a tmpfs that is full), never by replacing our own code. Process level: a
runtime process whose endpoint's inference folder is a small tmpfs that fills up while requests keep coming.
"""
import errno
import logging
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from databricks.sdk.service.serving import AiGatewayConfig, AiGatewayInferenceTableConfig
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from serving_mlops.serving.capture import MAGIC, InferenceLog, frame_record, read_records
from serving_mlops.tables import LocalTables, tables_for

from served import WAIT, SlowToLoad, create, entity, invoke, key, update
from serving_mlops.deploy import wait_not_updating


TABLE = "dev.credit.reliable_payload"


def record(i: int, pad: int = 0) -> dict:
    return {"databricks_request_id": f"r{i}", "request_time_us": 1_700_000_000_000_000 + i, "status_code": 200,
            "execution_duration_ms": 2, "served_entity_id": "e1", "requester": "me", "client_request_id": f"c{i}",
            "request": '{"inputs": [[1]]}' + " " * pad, "response": {"predictions": [0.5]}}


@pytest.fixture
def tables(tmp_path):
    return LocalTables(tmp_path / "tables")


def open_log(folder: Path, tables) -> InferenceLog:
    return InferenceLog(folder, TABLE, tables, interval=3600)  # the tests flush by hand


def kill(log: InferenceLog):
    "Leave the log as a killed process does: no final flush, its file closed by the kernel."
    log.stopped.set(); log.thread.join(); os.close(log.fd)


def killed_after(folder: Path, tables, n: int) -> Path:
    "Write records 0..n-1 and kill the log; returns the segment they are in."
    log = open_log(folder, tables)
    assert all(log.write(record(i)) for i in range(n))
    kill(log)
    return log._path(log.segment)


def table_ids(tables) -> list:
    return tables.read_pandas(TABLE).databricks_request_id.tolist() if tables.exists(TABLE) else []


def skipped_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if "damaged or torn bytes" in r.getMessage()]


# -- the record format ---------------------------------------------------------------------------------------------------

records_strategy = st.lists(st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-2**53, 2**53), st.text(max_size=20))),
                            min_size=1, max_size=8)


@settings(max_examples=100, deadline=None)
@given(records_strategy, st.data())
def test_a_changed_bit_costs_exactly_the_record_it_is_in(records, data):
    frames = [frame_record(r) for r in records]
    k = data.draw(st.integers(0, len(frames) - 1))
    start = sum(map(len, frames[:k]))
    pos, bit = data.draw(st.integers(start, start + len(frames[k]) - 1)), data.draw(st.integers(0, 7))
    damaged = bytearray(b"".join(frames)); damaged[pos] ^= 1 << bit
    assert read_records(bytes(damaged)) == (records[:k] + records[k + 1:], [(start, len(frames[k]))])


@settings(max_examples=100, deadline=None)
@given(records_strategy, st.data())
def test_a_cut_keeps_every_whole_record_before_it(records, data):
    whole = b"".join(frame_record(r) for r in records)
    cut = data.draw(st.integers(0, len(whole)))
    kept, skipped = read_records(whole[:cut])
    assert kept == records[:len(kept)]
    assert sum(len(frame_record(r)) for r in kept) + sum(n for _, n in skipped) == cut and len(skipped) <= 1


# -- the log against a real Delta table ----------------------------------------------------------------------------------

def test_a_torn_tail_is_skipped_reported_once_and_later_records_arrive(tmp_path, tables, caplog):
    folder = tmp_path / "ep"
    segment = killed_after(folder, tables, 5)
    segment.write_bytes(segment.read_bytes()[:-7])  # record 4 cut short, as a killed process may leave it
    again = open_log(folder, tables)
    assert all(again.write(record(i)) for i in range(5, 8))
    with caplog.at_level(logging.WARNING):
        assert again.flush() == 7
        again.write(record(8)); again.flush()
    assert sorted(table_ids(tables)) == [f"r{i}" for i in (0, 1, 2, 3, 5, 6, 7, 8)]
    assert len(skipped_warnings(caplog)) == 1 and segment.name in skipped_warnings(caplog)[0]  # logged once, naming the file
    assert again.counts["damaged"] == 1 and again.status() == {"status": "OK", "records_waiting": 0, "records_lost": 0, "damaged_regions": 1}
    again.close()


def test_damaged_records_in_the_middle_are_skipped_and_do_not_block_the_records_after_them(tmp_path, tables, caplog):
    folder = tmp_path / "ep"
    segment = killed_after(folder, tables, 10)
    data = bytearray(segment.read_bytes())
    data[data.index(b'"r3"') + 1] = ord("X")  # a changed byte in record 3's JSON
    length = data.rindex(MAGIC, 0, data.index(b'"r6"')) + len(MAGIC)
    data[length:length + 4] = b"\xff\xff\xff\x7f"  # record 6's length field
    segment.write_bytes(bytes(data))
    for restart in range(2):  # the damage blocks nothing, across restarts either
        log = open_log(folder, tables)
        assert all(log.write(record(100 + 10 * restart + i)) for i in range(3))
        with caplog.at_level(logging.WARNING): log.flush()
        kill(log)
    expected = [f"r{i}" for i in (0, 1, 2, 4, 5, 7, 8, 9)] + [f"r{100 + 10 * k + i}" for k in range(2) for i in range(3)]
    assert sorted(table_ids(tables)) == sorted(expected)
    assert len(skipped_warnings(caplog)) == 2


def test_a_failure_after_the_delta_commit_and_a_lost_position_never_append_a_segment_twice(tmp_path, tables, monkeypatch):
    "The table's txn is the position: a segment the table has is not appended again, neither by a retry nor after a restart."
    folder = tmp_path / "ep"
    log = open_log(folder, tables)
    assert all(log.write(record(i)) for i in range(50))
    real_unlink = os.unlink
    def refuse(path, *a, **kw):
        if str(path).endswith(".wal"): raise PermissionError(errno.EACCES, "refused by the test", str(path))
        return real_unlink(path, *a, **kw)
    monkeypatch.setattr(os, "unlink", refuse)  # the step after the Delta commit fails
    with pytest.raises(PermissionError): log.flush()
    version = tables.version(TABLE)
    assert len(table_ids(tables)) == 50 and tables.transaction_version(TABLE, log.app_id) == log.position
    with pytest.raises(PermissionError): log.flush()  # a retry deletes; it appends nothing
    kill(log)
    (folder / "committed.json").write_bytes(b"\x00garbage")  # where an earlier version kept the position: ignored
    again = open_log(folder, tables)  # a restart, the segment still there: the position comes from the table
    with pytest.raises(PermissionError): again.flush()
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert again.flush() == 0 and tables.version(TABLE) == version
    assert again.write(record(50)) and again.flush() == 1
    ids = table_ids(tables)
    assert sorted(ids) == sorted(f"r{i}" for i in range(51)) and len(set(ids)) == len(ids)
    again.close()


# -- a full disk ---------------------------------------------------------------------------------------------------------

def mount_tmpfs(folder: Path, size: str):
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"the full-disk test mounts a small tmpfs on {folder}, which needs root (CAP_SYS_ADMIN): "
                    f"mount exited {done.returncode}: {done.stderr.strip()}")


def unmount(folder: Path):
    for _ in range(20):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode == 0: return
        time.sleep(0.25)  # a file on it may still be open
    subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(path: Path):
    "Write `path` until the disk is full."
    with open(path, "ab", buffering=0) as f:
        try:
            while True: f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_a_full_disk_loses_only_the_records_it_reports_and_writing_resumes_when_space_returns(tmp_path, tables):
    folder = tmp_path / "ep"
    mount_tmpfs(folder, "64k")
    try:
        log = open_log(folder, tables)
        first = [log.write(record(i, pad=300)) for i in range(10)]
        fill(folder / "filler")
        full = [log.write(record(10 + i, pad=300)) for i in range(150)]
        assert log.status()["status"] == "WRITE_FAILING" and "No space left" in log.status()["message"]
        segment = log._path(log.segment)
        assert read_records(segment.read_bytes())[1] == []  # every failed write was cut back: no half record
        log.flush()
        (folder / "filler").unlink()
        after = [log.write(record(160 + i, pad=300)) for i in range(30)]
        assert log.status()["status"] == "OK"
        log.close()
        written = [f"r{i}" for i, ok in enumerate(first + full + after) if ok]
        ids = table_ids(tables)
        assert all(first) and all(after) and full.count(False) > 100
        assert sorted(ids) == sorted(written) and len(set(ids)) == len(ids)  # every acknowledged record once, no other
        assert (log.counts["lost"], log.counts["written"], log.counts["damaged"]) == (full.count(False), len(written), 0)
    finally:
        unmount(folder)


def metric(ws, name: str, family: str, **labels) -> float:
    "One sample of the endpoint's metrics export."
    text = httpx.get(f"{ws.url}/api/2.0/serving-endpoints/{name}/metrics", headers={"Authorization": f"Bearer {ws.token}"}).text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == family and labels.items() <= s.labels.items())


def capture_state(ws, name: str) -> dict:
    r = httpx.get(f"{ws.url}/api/2.0/serving-endpoints/{name}", headers={"Authorization": f"Bearer {ws.token}"})
    return r.json()["state"]["inference_table"]


def test_a_runtime_with_a_full_disk_answers_every_request_counts_what_it_could_not_log_and_resumes(ws):
    env, name = ws.env, "fulldisk"
    folder, table = env.path("serving", "inference", name), "dev.credit.fulldisk_payload"
    mount_tmpfs(folder, "256k")  # before the endpoint exists: its inference log lives on it
    try:
        create(ws, name, entity(ws, ws.v1), ai_gateway=AiGatewayConfig(inference_table_config=AiGatewayInferenceTableConfig(
            catalog_name="dev", schema_name="credit", table_name_prefix="fulldisk", enabled=True)))
        answered, seen = [], []
        def send(n, full=False):
            with httpx.Client() as client:
                for i in range(n):
                    if full: fill(folder / "filler")  # a flush frees the pages of the segments it deletes: full again
                    r = invoke(ws, name, {"dataframe_records": [key(1 + i % 300)]}, client)
                    assert r.status_code == 200, r.text
                    answered.append(r.headers["x-request-id"])
                    if full and i % 10 == 9: seen.append(capture_state(ws, name))
        send(20)
        send(150, full=True)
        failing = [s for s in seen if s["status"] == "WRITE_FAILING"]
        assert failing and "No space left on device" in failing[-1]["message"] and failing[-1]["records_lost"] > 0
        (folder / "filler").unlink()
        send(30)
        tables, deadline = tables_for(env), time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = tables.read_pandas(table).databricks_request_id if tables.exists(table) else []
            if len(rows) and len(rows) == metric(ws, name, "serving_capture_records_written_total"): break
            time.sleep(0.5)
        lost = metric(ws, name, "serving_capture_records_lost_total")
        after = capture_state(ws, name)
        acknowledged, in_table = set(answered), set(rows)
        print(f"full-disk runtime: {len(answered)} answered (all 200), {len(in_table)} in the table, {int(lost)} counted lost, "
              f"{len(rows) - len(in_table)} duplicated")
        assert rows.is_unique, "a record is in the inference table twice"
        assert in_table <= acknowledged and len(acknowledged - in_table) == lost == after["records_lost"]  # lost: exactly those counted
        assert set(answered[:20]) <= in_table and set(answered[-30:]) <= in_table  # before the disk filled, and after space returned
        assert 75 <= lost <= 150 and after["status"] == "OK" and "message" not in after  # capture resumed by itself
        assert metric(ws, name, "serving_capture_failing", stage="write") == metric(ws, name, "serving_capture_failing", stage="flush") == 0
        assert after["records_waiting"] == metric(ws, name, "serving_capture_records_waiting") == 0  # every acknowledged record is in the table
    finally:
        try: ws.w.serving_endpoints.delete(name)  # closes the log's files on the tmpfs
        finally: unmount(folder)


def test_requests_refused_while_the_endpoint_loads_are_captured_without_a_served_entity(ws):
    "Issue 28 item 8: a 503 while an endpoint's served entities load was answered but never reached its inference table."
    import mlflow
    import numpy as np
    import pandas as pd
    from databricks.sdk.service.serving import EndpointCoreConfigInput
    from serving_mlops.monitoring.checks import request_stats
    env, name = ws.env, "loading"
    rows = pd.DataFrame([{c: ws.features(cid)[c] for c in ws.columns} for cid in range(1, 4)])  # features only: a plain pyfunc (issue 30)
    ws.world.use_mlflow()
    with mlflow.start_run():
        slow = mlflow.pyfunc.log_model(name="slow_to_load", python_model=SlowToLoad(), registered_model_name=env.var("model_name"),
                                       signature=mlflow.models.infer_signature(rows, np.zeros(len(rows))), pip_requirements=["mlflow"])
    gateway = AiGatewayConfig(inference_table_config=AiGatewayInferenceTableConfig(catalog_name="dev", schema_name="credit",
                                                                                   table_name_prefix=name, enabled=True))
    start = pd.Timestamp.now(tz="UTC")
    ws.w.serving_endpoints.create(name, config=EndpointCoreConfigInput(name=name, served_entities=[entity(ws, str(slow.registered_model_version))]),
                                  ai_gateway=gateway)  # not waited for: it loads for 5 s
    body = {"dataframe_records": rows.head(1).to_dict("records")}
    refused = invoke(ws, name, body)
    assert (refused.status_code, refused.json()["error_code"]) == (503, "TEMPORARILY_UNAVAILABLE"), refused.text
    wait_not_updating(ws.w, name, WAIT)
    answered = invoke(ws, name, body)
    assert answered.status_code == 200, answered.text
    table, deadline = f"dev.credit.{name}_payload", time.monotonic() + 60
    while time.monotonic() < deadline and not (tables_for(env).exists(table) and tables_for(env).count(table) == 2): time.sleep(0.3)
    got = tables_for(env).read_pandas(table).set_index("databricks_request_id")
    first, second = got.loc[refused.headers["x-request-id"]], got.loc[answered.headers["x-request-id"]]
    assert (first.status_code, first.served_entity_id, "is not ready" in first.response) == (503, None, True), first.to_dict()
    assert second.status_code == 200 and second.served_entity_id is not None and first.request == second.request
    metrics = request_stats(env, name, start, pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=1), pd.Timedelta(hours=1))
    assert (metrics.requests.sum(), metrics.errors_5xx.sum()) == (2, 1), metrics.to_dict("records")  # the refusal counts, apart
    assert metrics.served_entity_name.isna().sum() == 1, metrics.to_dict("records")
    ws.w.serving_endpoints.delete(name)


def test_an_update_whose_config_cannot_be_saved_adds_nothing_to_the_served_entities_history(ws):
    "Issue 28 item 8: a config update whose save failed (a full disk) had already appended its served entities to the history."
    from serving_mlops.serving.capture import SERVED_ENTITIES_TABLE
    env, name = ws.env, "unsaved"
    create(ws, name, entity(ws, ws.v1))
    history = lambda: tables_for(env).read_pandas(SERVED_ENTITIES_TABLE, filters=[("endpoint_name", "=", name)])
    before, state = history(), env.path("serving", "endpoints")
    saved = (state / f"{name}.json").read_bytes()
    mount_tmpfs(state, "64k")  # over the saved records (the runtime holds them): the update's save goes to a full disk
    try:
        fill(state / "filler")
        ws.w.serving_endpoints.update_config(name, served_entities=[entity(ws, ws.v2)])
        deadline = time.monotonic() + 60
        while (ep := ws.w.serving_endpoints.get(name)).state.config_update.value == "IN_PROGRESS" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ep.state.config_update.value == "UPDATE_FAILED" and ep.config.served_entities[0].entity_version == ws.v1
        assert "cannot save serving endpoint 'unsaved'" in ep.pending_config.served_entities[0].state.deployment_state_message
        assert history().equals(before)  # no row for a config that was never saved, so never served
        assert invoke(ws, name, {"dataframe_records": [key(1)]}).headers["served-model-name"] == f"default_model-{ws.v1}"
    finally: unmount(state)
    assert (state / f"{name}.json").read_bytes() == saved
    ep = update(ws.w, name, served_entities=[entity(ws, ws.v2)])  # with room again, it goes through
    assert ep.config.served_entities[0].entity_version == ws.v2 and len(history()) == len(before) + 1
    ws.w.serving_endpoints.delete(name)
