"""Reliability of the control plane (issue 16), against the real runtime process: every change is checked in full, saved
atomically, then made in memory; a bad call changes nothing, on disk or in memory; one endpoint whose saved state or
resources are broken is reported and the others serve; and a fuzz of control-plane bodies never gets a 5xx."""
import copy
import os
import shutil
import time

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving_mlops.serving.app import API
from serving_mlops.serving.services import server_file, stop_server
from serving_mlops.tables import tables_for

from served import create, entity, invoke, key  # noqa: E402


ENTITY_KEYS = ("name", "entity_name", "entity_version", "workload_size", "scale_to_zero_enabled", "environment_vars")


@pytest.fixture(scope="module")
def api(ws):
    "A keep-alive client of the runtime's control plane: api(method, path, body) -> response."
    with httpx.Client(headers={"Authorization": f"Bearer {ws.token}"}, timeout=60) as client:
        def call(method, path="", body=None):
            content = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else None
            return client.request(method, ws.url + API + path, content=content)
        yield call


def state_file(ws, name):
    return ws.env.path("serving", "endpoints") / f"{name}.json"


def saved(ws, name):
    "An endpoint's saved record, in the form GET's answer is compared with."
    r = orjson.loads(state_file(ws, name).read_bytes())
    c = r.get("config")
    return {"name": r["name"], "id": r["id"], "tags": r.get("tags") or {}, "ai_gateway": r.get("ai_gateway") or {},
            "config": c and {"served_entities": [{k: e.get(k) for k in ENTITY_KEYS} for e in c["served_entities"]],
                             "traffic_config": c["traffic_config"], "config_version": c["config_version"]}}


def served(api, name):
    "What GET says of an endpoint, in the form it is saved."
    j = api("GET", f"/{name}").json()
    c = j.get("config")
    return {"name": j["name"], "id": j["id"], "tags": {t["key"]: t.get("value") for t in j.get("tags", [])}, "ai_gateway": j.get("ai_gateway", {}),
            "config": c and {"served_entities": [{k: e.get(k) for k in ENTITY_KEYS} for e in c["served_entities"]],
                             "traffic_config": c["traffic_config"], "config_version": c["config_version"]}}


def settled(api, name, timeout=60):
    "GET of `name` once no config update is in progress."
    deadline = time.monotonic() + timeout
    while (j := api("GET", f"/{name}").json())["state"]["config_update"] == "IN_PROGRESS" and time.monotonic() < deadline: time.sleep(0.1)
    return j


def restart(ws):
    "Stop the runtime gracefully and start it again (the process restores every saved endpoint)."
    log_size = server_log(ws).stat().st_size
    assert stop_server(ws.env) and not server_file(ws.env).exists()
    ws.start()
    return log_size


def server_log(ws): return ws.env.path("serving") / "server.log"


def refused(r, status, field):
    "The response refuses the call with `status`, a Databricks error code and a message naming `field`."
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error_code"] == {400: "INVALID_PARAMETER_VALUE", 404: "RESOURCE_DOES_NOT_EXIST", 500: "INTERNAL_ERROR"}[status], body
    assert field in body["message"], body
    return body["message"]


def create_body(ws, name, version=None, **kw):
    return {"name": name, "config": {"served_entities": [{"entity_name": ws.env.var("model_name"), "entity_version": version or ws.v1}]}, **kw}


def gateway(prefix=None, catalog="dev", schema="credit", enabled=True):
    table = {"catalog_name": catalog, "schema_name": schema, "enabled": enabled}
    return {"inference_table_config": table if prefix is None else {**table, "table_name_prefix": prefix}}


def block_folder(path):
    "Make `path` impossible to use as a folder (a file stands there): the runtime runs as root here, so permissions would not stop it."
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder")


def test_an_inference_table_without_prefix_takes_the_endpoint_name_and_survives_a_restart(ws, api):
    "Finding 1: no table_name_prefix answered 500 after saving, and the runtime then failed to start."
    r = api("POST", "", create_body(ws, "noprefix", ai_gateway=gateway()))
    assert r.status_code == 200, r.text
    assert r.json()["ai_gateway"]["inference_table_config"]["table_name_prefix"] == "noprefix"
    settled(api, "noprefix")
    before = served(api, "noprefix")
    assert before == saved(ws, "noprefix")
    restart(ws)
    assert settled(api, "noprefix")["state"]["ready"] == "READY" and served(api, "noprefix") == before
    assert invoke(ws, "noprefix", {"dataframe_records": [key(3)]}).status_code == 200
    message = refused(api("POST", "", create_body(ws, "no-prefix", ai_gateway=gateway())), 400, "table name 'dev.credit.no-prefix_payload'")
    assert "letters, digits and underscores" in message and not state_file(ws, "no-prefix").exists()


@pytest.mark.parametrize("field,value", [("catalog_name", ".."), ("schema_name", "a/b"), ("table_name_prefix", "../../x"),
                                         ("table_name_prefix", "x\n"), ("catalog_name", "x" * 256), ("catalog_name", 7)])
def test_path_like_or_invalid_inference_table_names_are_refused_and_change_nothing(ws, api, field, value):
    "Finding 5: '..' and '../../x' were accepted; records never flushed and the endpoint could not be deleted."
    if api("GET", "/names").status_code == 404:
        assert api("POST", "", create_body(ws, "names", ai_gateway=gateway("names"))).status_code == 200
        settled(api, "names")
    before, on_disk = served(api, "names"), state_file(ws, "names").read_bytes()
    body = gateway("ok")
    body["inference_table_config"][field] = value
    refused(api("PUT", "/names/ai-gateway", body), 400, f"inference_table_config.{field}")
    assert served(api, "names") == before and state_file(ws, "names").read_bytes() == on_disk
    refused(api("POST", "", create_body(ws, "badnames", ai_gateway=body)), 400, f"inference_table_config.{field}")
    assert api("GET", "/badnames").status_code == 404 and not state_file(ws, "badnames").exists()


def test_an_endpoint_name_with_a_trailing_newline_is_refused(ws, api):
    "Finding 7: the name check's `$` matched before a trailing newline and `endpoints/x\\n.json` was made."
    for name in ("x\n", "x\n\n", "\nx", "x/y", "..", "x" * 64):
        refused(api("POST", "", create_body(ws, name)), 400, f"endpoint name {name!r} is invalid")
    assert not [p.name for p in state_file(ws, "x").parent.iterdir() if "\n" in p.name or p.name.startswith(".")]


def test_malformed_bodies_answer_400_naming_the_field_and_change_nothing(ws, api):
    "Finding 6: traffic_config as a string or list, a served entity name that is not a string and malformed tags answered 500."
    create(ws, "shapes", entity(ws, ws.v1))
    assert api("PATCH", "/shapes/tags", {"add_tags": [{"key": "team", "value": "risk"}]}).status_code == 200
    before, on_disk = served(api, "shapes"), state_file(ws, "shapes").read_bytes()
    entities = [{"entity_name": ws.env.var("model_name"), "entity_version": ws.v1}]
    for config, field in [({"served_entities": entities, "traffic_config": "routes"}, "config.traffic_config must be an object"),
                          ({"served_entities": entities, "traffic_config": []}, "config.traffic_config must be an object"),
                          ({"served_entities": [{**entities[0], "name": 7}]}, "config.served_entities[0].name must be a string"),
                          ({"served_entities": [{**entities[0], "name": "a\nb"}]}, "config.served_entities[0].name 'a\\nb' is invalid"),
                          ({"served_entities": entities, "traffic_config": {"routes": ["a"]}}, "config.traffic_config.routes[0] must be an object")]:
        refused(api("PUT", "/shapes/config", config), 400, field)
        refused(api("POST", "", {"name": "shapes2", "config": config}), 400, field)
    tag_bodies = [({"add_tags": {"key": "a"}}, "add_tags must be a list"), ({"add_tags": ["a"]}, "add_tags[0] must be an object"),
                  ({"add_tags": [{"key": 1, "value": "x"}]}, "add_tags[0].key must be a non-empty string"),
                  ({"add_tags": [{"key": "a", "value": 1}]}, "add_tags[0].value must be a string"),
                  ({"add_tags": [{"value": "x"}]}, "add_tags[0].key must be a non-empty string"),
                  ({"delete_tags": "team"}, "delete_tags must be a list"), ({"delete_tags": [["team"]]}, "delete_tags[0] must be a tag key")]
    for body, field in tag_bodies:
        refused(api("PATCH", "/shapes/tags", body), 400, field)
        if "add_tags" in body:
            refused(api("POST", "", {**create_body(ws, "shapes2"), "tags": body["add_tags"]}), 400, field.replace("add_tags", "tags"))
    assert api("GET", "/shapes2").status_code == 404 and not state_file(ws, "shapes2").exists()
    assert served(api, "shapes") == before and state_file(ws, "shapes").read_bytes() == on_disk


def test_a_refused_change_leaves_what_is_served_what_is_saved_and_what_a_restart_brings_back_equal(ws, api):
    "Finding 4: an integer tag key answered 500 but stayed in memory; PUT config then served version 2 while the file kept 1."
    create(ws, "drift", entity(ws, ws.v1))
    refused(api("PATCH", "/drift/tags", {"add_tags": [{"key": 5, "value": "x"}]}), 400, "add_tags[0].key")
    assert served(api, "drift")["tags"] == {}
    r = api("PUT", "/drift/config", {"served_entities": [{"entity_name": ws.env.var("model_name"), "entity_version": ws.v2}]})
    assert r.status_code == 200, r.text
    assert settled(api, "drift")["config"]["config_version"] == 2
    assert served(api, "drift") == saved(ws, "drift") and saved(ws, "drift")["config"]["served_entities"][0]["entity_version"] == ws.v2
    assert api("PATCH", "/drift/tags", {"add_tags": [{"key": "stage", "value": "canary"}, {"key": "pii"}]}).status_code == 200
    # PUT ai-gateway whose inference log cannot open: a 500 naming the folder, and capture stays off on disk and in memory
    folder = ws.env.path("serving", "inference", "drift")
    block_folder(folder)
    before, on_disk = served(api, "drift"), state_file(ws, "drift").read_bytes()
    refused(api("PUT", "/drift/ai-gateway", gateway("drift")), 500, str(folder))
    assert served(api, "drift") == before and state_file(ws, "drift").read_bytes() == on_disk
    assert "ai_gateway" not in api("GET", "/drift").json()
    folder.unlink()
    restart(ws)
    assert settled(api, "drift")["state"]["ready"] == "READY" and served(api, "drift") == before


def test_a_create_that_fails_leaves_no_ghost(ws, api):
    "Finding 4: a create that failed with 500 left a NOT_READY endpoint that blocked re-creation until a restart."
    folder = ws.env.path("serving", "inference", "ghost")
    block_folder(folder)
    refused(api("POST", "", create_body(ws, "ghost", ai_gateway=gateway("ghost"))), 500, f"cannot open its inference log in {folder}")
    assert api("GET", "/ghost").status_code == 404 and not state_file(ws, "ghost").exists()
    assert "ghost" not in [e["name"] for e in api("GET").json()["endpoints"]]
    folder.unlink()
    assert api("POST", "", create_body(ws, "ghost", ai_gateway=gateway("ghost"))).status_code == 200
    assert settled(api, "ghost")["state"]["ready"] == "READY"


def test_an_inference_table_that_cannot_be_written_fails_neither_delete_nor_a_graceful_stop(ws, api):
    "Finding 5: deleting an endpoint whose records could not flush answered 500; a graceful stop failed and left server.json."
    for name in ("unflushed", "unflushed2"):
        assert api("POST", "", create_body(ws, name, ai_gateway=gateway(name))).status_code == 200
        block_folder(tables_for(ws.env).path(f"dev.credit.{name}_payload"))  # the Delta table cannot be made there
        settled(api, name)
        assert invoke(ws, name, {"dataframe_records": [key(1)]}).status_code == 200
    time.sleep(1.5)  # a flush or two fail, and are logged
    r = api("DELETE", "/unflushed")
    assert r.status_code == 200, r.text
    assert api("GET", "/unflushed").status_code == 404 and not state_file(ws, "unflushed").exists()
    log_size = restart(ws)  # stops with unflushed2's records unflushable
    log = server_log(ws).read_text(errors="replace")[log_size:]
    assert "Application shutdown failed" not in log and "kept for a later flush to dev.credit.unflushed2_payload" in log
    api("DELETE", "/unflushed2")
    for name in ("unflushed", "unflushed2"): os.remove(tables_for(ws.env).path(f"dev.credit.{name}_payload"))


def test_unreadable_saved_state_is_reported_and_every_other_endpoint_serves(ws, api):
    "Finding 1: a truncated, empty or name-less state file, or an unwritable inference folder, kept the runtime from starting."
    create(ws, "healthy", entity(ws, ws.v1))
    good = state_file(ws, "healthy").read_bytes()
    record = orjson.loads(good)
    broken = {"truncated": good[: len(good) // 2], "empty": b"", "nameless": orjson.dumps({k: v for k, v in record.items() if k != "name"}),
              "listed": b"[]", "misnamed": good, "badtags": orjson.dumps({**record, "name": "badtags", "tags": {"k": 1}})}
    for name, data in broken.items(): state_file(ws, name).write_bytes(data)
    state_file(ws, "folder").mkdir()  # issue 28 item 8: a folder where the state file should be (DELETE answered 500)
    (state_file(ws, "folder") / "x").write_bytes(good)
    broken["folder"] = None
    state_file(ws, "capturing").write_bytes(orjson.dumps({**record, "name": "capturing", "ai_gateway": gateway("capturing")}))
    block_folder(ws.env.path("serving", "inference", "capturing"))
    log_size = restart(ws)
    assert settled(api, "healthy")["state"]["ready"] == "READY"
    assert invoke(ws, "healthy", {"dataframe_records": [key(4)]}).status_code == 200
    log = server_log(ws).read_text(errors="replace")[log_size:]
    for name in [*broken, "capturing"]:
        j = api("GET", f"/{name}").json()
        assert j["state"] == {"ready": "NOT_READY", "config_update": "UPDATE_FAILED"}, j
        message = j["pending_config"]["served_entities"][0]["state"]["deployment_state_message"]
        assert str(state_file(ws, name)) in message and f"cannot restore serving endpoint '{name}'" in message and message in log
        r = api("PATCH", f"/{name}/tags", {"add_tags": [{"key": "a"}]})
        assert (r.status_code, r.json()["error_code"]) == (400, "INVALID_STATE") and str(state_file(ws, name)) in r.json()["message"]
        assert invoke(ws, name, {"dataframe_records": [key(4)]}).status_code == 400
    assert "Is a directory" in log and "not JSON" in log and "it names endpoint None" in log and "it names endpoint 'healthy'; its file name says 'misnamed'" in log
    assert "cannot open its inference log" in log and "tags[0].value must be a string" in log
    for name in [*broken, "capturing"]:
        assert api("DELETE", f"/{name}").status_code == 200 and not state_file(ws, name).exists()
    os.remove(ws.env.path("serving", "inference", "capturing"))
    assert {e["name"] for e in api("GET").json()["endpoints"]}.isdisjoint([*broken, "capturing"])


# --- fuzz -----------------------------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=20) | st.sampled_from(["", "..", "../../x", "x\n", "a/b", " ", "dev", "1", "Small", "x" * 300]),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


def paths(value, prefix=()):
    "Every path into a JSON value (keys and indices), the root included."
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items: yield from paths(v, (*prefix, k))


@st.composite
def mutated(draw, valid):
    "A valid body with one to three parts replaced by any JSON value, deleted, or given an extra key."
    body = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths(body))))
        if not where: return draw(json_values)
        parent = body
        for k in where[:-1]: parent = parent[k]
        how = draw(st.sampled_from(["replace", "delete", "extra"]))
        if how == "delete" and isinstance(parent, dict): del parent[where[-1]]
        elif how == "extra" and isinstance(parent[where[-1]], dict): parent[where[-1]][draw(st.text(max_size=12))] = draw(json_values)
        else: parent[where[-1]] = draw(json_values)
    return body


def bodies(valid):
    return st.one_of(mutated(valid), json_values, st.dictionaries(st.sampled_from(list(valid) + ["x"]), json_values, max_size=4))


@pytest.mark.soak
def test_fuzzed_control_plane_bodies_never_get_a_5xx_and_what_is_served_stays_what_is_saved(ws, api, soak):
    cases = 1_300 if soak else 400  # per target (create, PUT config, PUT ai-gateway, PATCH tags): make soak's, make test's
    model = ws.env.var("model_name")
    create(ws, "fz", entity(ws, ws.v1))
    earlier = [e["name"] for e in api("GET").json()["endpoints"]]
    statuses = {}
    absent = [{"entity_name": model, "entity_version": "999", "name": "a"}, {"entity_name": model, "entity_version": "998", "name": "b"}]
    config = {"served_entities": absent, "traffic_config": {"routes": [{"served_entity_name": "a", "traffic_percentage": 60},
                                                                      {"served_entity_name": "b", "traffic_percentage": 40}]}}
    targets = {  # valid bodies to mutate: versions that do not exist load nothing (a valid update fails in the background)
        ("POST", ""): {"name": "fz-new", "config": config, "tags": [{"key": "k", "value": "v"}], "description": "d",
                       "ai_gateway": gateway("fz_new", enabled=False)},
        ("PUT", "/fz/config"): config,
        ("PUT", "/fz/ai-gateway"): gateway("fz"),
        ("PATCH", "/fz/tags"): {"add_tags": [{"key": "k", "value": "v"}, {"key": "n"}], "delete_tags": ["k", "x"]}}
    drawn = []  # every body first, then sent in order (as the invocations' fuzz: one thread draws, then sends)
    for (method, path), valid in targets.items():
        @settings(max_examples=cases, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(bodies(valid))
        def draw(body): drawn.append((method, path, body))
        draw()
    for method, path, body in drawn:
        r = api(method, path, body)
        statuses.setdefault(r.status_code, []).append((method, path, body, r.text))
    assert not [s for s in statuses if s >= 500], {s: v[:3] for s, v in statuses.items() if s >= 500}
    total = sum(len(v) for v in statuses.values())
    print(f"fuzzed {total} control-plane bodies: " + ", ".join(f"{s}: {len(v)}" for s, v in sorted(statuses.items())))
    assert total >= 4 * cases and not [s for s in statuses if s >= 500]
    assert len(statuses.get(200, [])) > total / 52 and len(statuses.get(400, [])) > total / 5.2  # both accepted and refused bodies were sent
    now = [e["name"] for e in api("GET").json()["endpoints"]]
    for name in now: settled(api, name)
    for name in earlier:
        assert invoke(ws, name, {"dataframe_records": [key(2)]}).status_code == 200, name
    before = {name: served(api, name) for name in now}
    assert before == {name: saved(ws, name) for name in now}  # GET == disk, for every endpoint
    restart(ws)
    for name in now: settled(api, name)
    assert {name: served(api, name) for name in now} == before  # a restart brings back exactly what was acknowledged
    for name in set(now) - set(earlier): assert api("DELETE", f"/{name}").status_code == 200
