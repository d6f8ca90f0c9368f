"""Workspace-side contracts of training, the registry and Lakehouse Monitoring, against the real MLflow and databricks-sdk
clients (the monitoring ones: the metric tables' schema, the monitor's calls, a workspace check; at the end of the module).

A Databricks workspace cannot exist on this machine. `WorkspaceStandIn` stands in for its REST API: a real
HTTP server on 127.0.0.1 answering the routes the clients call here (MLflow experiments, the Workspace API's
`mkdirs`, the Unity Catalog model registry's `model-versions/search` and `model-versions/get`), the way the
Databricks REST reference documents them, and refusing what a workspace refuses (an experiment whose parent
folder does not exist). What is stood in is that server only: MLflow's `databricks` tracking store, its
Unity Catalog registry store (`UcModelRegistryStore`, which builds `ModelVersionSearch` objects) and
databricks-sdk's `WorkspaceClient` are the real ones, talking HTTP to it.
"""
import inspect
import json
import re
import subprocess
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, RestStandIn
from mlflow.entities.model_registry.model_version_search import ModelVersionSearch

from serving_mlops.config import get_environment, workspace_home
from serving_mlops.feature_store import in_experiment
from serving_mlops.naming import experiment_name
from serving_mlops.registry import copied_version, registry_client


class Handler(RestStandIn):
    def route(self, method):
        url, query, body = self.parsed()
        self.server.requests.append((method, url.path, query, body))
        if url.path == "/.well-known/databricks-config": return self.answer(200, {"workspace_id": "1234"})  # the SDK's probe
        route = getattr(self.server, (method + url.path).replace("/", "_").replace("-", "_").replace(".", "_"), None)
        if route is None: return self.answer(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"No API found for '{method} {url.path}'"})
        self.answer(*route(query, body))


class WorkspaceStandIn(ThreadingHTTPServer):
    "A workspace's REST API for experiments, workspace folders and UC model versions (see the module docstring)."
    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests, self.folders, self.experiments, self.versions, self.experiment_tags = [], {"/", "/Shared"}, {}, {}, {}

    # MLflow experiments (api/2.0/mlflow/experiments/...)
    def experiment(self, i): return {"experiment_id": i, "name": self.experiments[i], "lifecycle_stage": "active", "artifact_location": f"dbfs:/databricks/mlflow-tracking/{i}",
                                     "tags": [{"key": k, "value": v} for k, v in self.experiment_tags.get(i, {}).items()]}

    def POST_api_2_0_mlflow_experiments_set_experiment_tag(self, _, body):
        if body.get("experiment_id") not in self.experiments: return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"No experiment {body.get('experiment_id')}"}
        self.experiment_tags.setdefault(body["experiment_id"], {})[body["key"]] = body["value"]
        return 200, {}

    def GET_api_2_0_mlflow_experiments_get_by_name(self, q, _):
        found = [i for i, n in self.experiments.items() if n == q["experiment_name"]]
        if not found: return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Node {q['experiment_name']} does not exist."}
        return 200, {"experiment": self.experiment(found[0])}

    def GET_api_2_0_mlflow_experiments_get(self, q, _): return 200, {"experiment": self.experiment(q["experiment_id"])}

    def POST_api_2_0_mlflow_experiments_create(self, _, body):
        parent = body["name"].rsplit("/", 1)[0]
        if parent not in self.folders:  # what a workspace answers for /serving-mlops/prod/training at the root
            return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Parent directory {parent} does not exist."}
        i = str(len(self.experiments) + 1)
        self.experiments[i] = body["name"]
        return 200, {"experiment_id": i}

    # Workspace API
    def POST_api_2_0_workspace_mkdirs(self, _, body):
        parts = body["path"].strip("/").split("/")
        self.folders.update("/" + "/".join(parts[:n]) for n in range(1, len(parts) + 1))
        return 200, {}

    # Unity Catalog model registry
    def GET_api_2_0_mlflow_unity_catalog_model_versions_search(self, q, _):
        name = q["filter"].split("'")[1]
        return 200, {"model_versions": [{k: v for k, v in mv.items() if k != "tags"} for (n, _), mv in self.versions.items() if n == name]}

    def GET_api_2_0_mlflow_unity_catalog_model_versions_get(self, q, _):
        mv = self.versions.get((q["name"], q["version"]))
        if mv is None: return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Model version {q['name']}/{q['version']} not found"}
        return 200, {"model_version": mv}

    def add_version(self, name, version, tags):
        self.versions[(name, str(version))] = {"name": name, "version": str(version), "status": "READY", "source": f"dbfs:/m/{version}",
                                               "run_id": f"run{version}", "tags": [{"key": k, "value": v} for k, v in tags.items()]}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    server = WorkspaceStandIn()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bundle = tmp_path / "databricks.yml"
    bundle.write_text(f"""
variables:
  catalog: {{default: prod}}
  schema: {{default: credit}}
  model_name: {{default: "${{var.catalog}}.credit.default_model"}}
targets:
  staging: {{variables: {{catalog: staging}}}}
  prod: {{workspace: {{host: "{server.url}"}}}}
""")
    for var in ("DATABRICKS_CONFIG_PROFILE", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET", "MLFLOW_TRACKING_URI"): monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no-databrickscfg"))
    monkeypatch.setenv("DATABRICKS_HOST", server.url)  # MLflow's `databricks` URIs take the workspace from here
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-stand-in")
    monkeypatch.setenv("SERVING_MLOPS_HOME", str(tmp_path / "workspaces"))
    server.staging, server.prod = get_environment("staging", bundle), get_environment("prod", bundle)
    yield server
    server.shutdown(); server.server_close()


def test_experiments_are_made_in_a_folder_made_first(workspace):
    "Item 7: a workspace refuses /serving-mlops/<env>/... at its root; the experiment goes under /Shared, its folder made first."
    prod = workspace.prod
    name = experiment_name(prod, "training")
    assert name == "/Shared/serving-mlops/prod/training"
    with in_experiment(prod, name) as experiment:
        assert experiment.name == name
    calls = [(m, p) for m, p, _, _ in workspace.requests if "well-known" not in p]
    mkdirs = calls.index(("POST", "/api/2.0/workspace/mkdirs"))
    assert mkdirs < calls.index(("POST", "/api/2.0/mlflow/experiments/create"))
    assert [b for m, p, _, b in workspace.requests if p == "/api/2.0/workspace/mkdirs"] == [{"path": "/Shared/serving-mlops/prod"}]
    with in_experiment(prod, name): pass  # it exists now: no folder made again
    assert [p for _, p, _, _ in workspace.requests].count("/api/2.0/workspace/mkdirs") == 1
    tags = [b for _, p, _, b in workspace.requests if p == "/api/2.0/mlflow/experiments/set-experiment-tag"]  # the training view, tagged once
    assert [(b["key"], b["value"]) for b in tags] == [("mlflow.experimentKind", "custom_model_development")]
    with pytest.raises(mlflow.exceptions.MlflowException, match="Parent directory /serving-mlops/prod does not exist"):
        mlflow.MlflowClient("databricks").create_experiment("/serving-mlops/prod/training")  # the old name, as a workspace answers it


def test_a_copied_version_is_found_by_its_tags_on_unity_catalog(workspace):
    "Item 6: Unity Catalog searches answer ModelVersionSearch objects without tags; the copy is found through get_model_version."
    prod, staging = workspace.prod, workspace.staging
    workspace.add_version("prod.credit.default_model", 1, {"source_environment": "staging", "source_version": "1"})
    workspace.add_version("prod.credit.default_model", 2, {"source_environment": "staging", "source_version": "3"})
    workspace.add_version("prod.credit.default_model", 3, {})
    found = registry_client(prod).search_model_versions("name = 'prod.credit.default_model'")
    assert found and all(type(v) is ModelVersionSearch for v in found)  # the real store's objects, whose `tags` is a method
    with pytest.raises(Exception, match="do not have tags"): found[0].tags()
    copy = copied_version(prod, staging, 3)
    assert (copy.version, copy.tags["source_version"]) == ("2", "3")
    assert copied_version(prod, staging, 1).version == "1"
    assert copied_version(prod, staging, 5) is None
    gets = [q for _, p, q, _ in workspace.requests if p.endswith("model-versions/get")]
    assert {"name": "prod.credit.default_model", "version": "2"} in gets


# Lakehouse Monitoring's metric tables. No workspace is reachable: the authority is what a Databricks InferenceLog monitor
# wrote on one, as Databricks' own demo shows it (tests/lakehouse_monitoring_tables.json says where it was read), its Spark
# types turned into Arrow's by PySpark's own converter.
MONITOR_TABLES = json.loads((Path(__file__).parent / "lakehouse_monitoring_tables.json").read_text())
REGRESSION_METRICS = {"mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error", "r2_score",
                      "root_mean_squared_error"}  # the demo's monitor was a regression one; ours is a classifier


def databricks_metric_table(kind: str) -> list[tuple]:
    from pyspark.sql.pandas.types import to_arrow_schema
    from pyspark.sql.types import StructType
    schema = to_arrow_schema(StructType.fromJson(MONITOR_TABLES[kind]), timezone="UTC")
    return [(f.name, f.type) for f in schema if f.name not in REGRESSION_METRICS]


def test_the_local_metric_tables_have_the_columns_a_databricks_monitor_writes():
    from serving_mlops.monitoring.metric_tables import drift_metrics_schema, profile_metrics_schema
    model_id = MONITOR_TABLES["model_id_col"]
    for kind, ours in (("profile_metrics", profile_metrics_schema(model_id)), ("drift_metrics", drift_metrics_schema(model_id))):
        theirs = databricks_metric_table(kind)
        assert [(f.name, f.type) for f in ours] == theirs, (kind, set(ours.names) ^ {n for n, _ in theirs})
    # what the regression monitor had beyond the data profile: only its quality metrics (ours stay in <endpoint>_quality)
    assert {f["name"] for f in MONITOR_TABLES["profile_metrics"]["fields"]} - set(profile_metrics_schema(model_id).names) \
           == REGRESSION_METRICS


# Lakehouse Monitoring's monitor on a workspace target (monitoring.lakehouse). The stand-in answers databricks-sdk's
# quality_monitors calls at the paths the SDK calls (read from its source), keeping what it was sent; on a refresh it
# computes the metric tables of the monitored table against its baseline table with our own metric code (a stand-in
# for Databricks' computation, which cannot run here: what is checked is everything around it).
class MonitorHandler(RestStandIn):
    def route(self, method):
        url, _, body = self.parsed()
        self.server.calls.append((method, url.path, body))
        if url.path == "/.well-known/databricks-config": return self.answer(200, {"workspace_id": "1234"})
        m = re.fullmatch(r"/api/2\.1/unity-catalog/tables/([^/]+)/monitor(?:/refreshes(?:/(\d+))?)?", url.path)
        if not m: return self.answer(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"No API found for '{method} {url.path}'"})
        self.answer(*self.server.monitor_call(method, m.group(1), url.path.endswith("/refreshes") or m.group(2), m.group(2), body))
    def do_PUT(self): self.route("PUT")


class MonitorService(ThreadingHTTPServer):
    def __init__(self, refresh_states=("PENDING", "RUNNING", "SUCCESS"), compute=None):
        super().__init__(("127.0.0.1", 0), MonitorHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.calls, self.monitors, self.refreshes, self.states, self.compute = [], {}, {}, list(refresh_states), compute

    def monitor_call(self, method, table, refreshes, refresh_id, body):
        if not refreshes:
            if method == "GET":
                if table not in self.monitors: return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Monitor for {table} not found"}
                return 200, self.monitors[table]
            if method == "POST" and table in self.monitors: return 400, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": f"Monitor for {table} exists"}
            name = table.rsplit(".", 1)[1]
            self.monitors[table] = {**self.monitors.get(table, {}), **body, "table_name": table, "status": "MONITOR_STATUS_ACTIVE", "monitor_version": 0,
                                    "profile_metrics_table_name": f"{body['output_schema_name']}.{name}_profile_metrics",
                                    "drift_metrics_table_name": f"{body['output_schema_name']}.{name}_drift_metrics"}
            return 200, self.monitors[table]
        if method == "POST":
            rid = len(self.refreshes) + 1
            self.refreshes[rid] = iter(self.states)
            return 200, {"refresh_id": rid, "state": next(self.refreshes[rid]), "start_time_ms": 1}
        state = next(self.refreshes[int(refresh_id)], "SUCCESS")
        if state == "SUCCESS" and self.compute: self.compute(self.monitors[table])
        return 200, {"refresh_id": int(refresh_id), "state": state, "start_time_ms": 1,
                     **({"message": "Table schema changed: column 'age' is missing"} if state == "FAILED" else {})}


@pytest.fixture
def monitor_service():
    servers = []
    def start(**kw):
        s = MonitorService(**kw); servers.append(s)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        from databricks.sdk import WorkspaceClient
        return s, WorkspaceClient(host=s.url, token="dapi-test")
    yield start
    for s in servers: s.shutdown(); s.server_close()


def sdk_create_parameters(python: str | None = None) -> set[str]:
    "The parameters of databricks-sdk's QualityMonitorsAPI.create, in this interpreter or another (the replay's DBR 18 library set)."
    code = "import inspect; from databricks.sdk.service.catalog import QualityMonitorsAPI as A; print(' '.join(inspect.signature(A.create).parameters))"
    if python is None:
        from databricks.sdk.service.catalog import QualityMonitorsAPI
        return set(inspect.signature(QualityMonitorsAPI.create).parameters) - {"self"}
    return set(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()) - {"self"}


def test_the_monitor_is_created_once_updated_on_a_change_and_refreshed_until_it_ends(monitor_service, tmp_path):
    from serving_mlops.monitoring.lakehouse import ensure_monitor, monitor_settings, refresh_monitor
    from serving_mlops.monitoring.requests import MonitoringError
    with workspace_home(tmp_path): prod = get_environment("prod")
    service, w = monitor_service()
    settings = monitor_settings(prod, "credit-default-prod", 60)
    # the keyword arguments are create()'s, in the installed SDK and in Databricks Runtime 18 ML's (0.67)
    runtimes = sorted((ROOT / ".venv").glob("runtime-*/bin/python"))
    for python in [None, *map(str, runtimes[:1])]:
        assert set(settings) <= sdk_create_parameters(python), (python, set(settings) - sdk_create_parameters(python))
    info = ensure_monitor(w, settings)
    (get, _, _), (post, path, body) = service.calls[-2:]
    assert (get, post, path) == ("GET", "POST", "/api/2.1/unity-catalog/tables/prod.credit.credit_default_prod_unpacked/monitor")
    assert body["inference_log"] == {"problem_type": "PROBLEM_TYPE_REGRESSION", "timestamp_col": "request_time", "granularities": ["1 hour"],
                                     "prediction_col": "prediction", "model_id_col": "model_version"}, body
    assert (body["baseline_table_name"], body["slicing_exprs"], body["output_schema_name"]) == (
        "prod.credit.credit_default_prod_unpacked_baseline", ["served_entity_name"], "prod.credit"), body
    assert info.drift_metrics_table_name == "prod.credit.credit_default_prod_unpacked_drift_metrics"
    ensure_monitor(w, settings)  # as it is: read, not written
    assert [c[0] for c in service.calls[-1:]] == ["GET"]
    ensure_monitor(w, monitor_settings(prod, "credit-default-prod", 30))  # a new granularity: updated in place
    (method, _, body) = service.calls[-1]
    assert method == "PUT" and body["inference_log"]["granularities"] == ["30 minutes"] and "assets_dir" not in body, body
    done = refresh_monitor(w, settings["table_name"], sleep=lambda s: None)
    assert done.state.value == "SUCCESS" and [c[0] for c in service.calls[-3:]] == ["POST", "GET", "GET"]  # waited through PENDING, RUNNING

    failing, w2 = monitor_service(refresh_states=("PENDING", "FAILED"))
    ensure_monitor(w2, settings)
    with pytest.raises(MonitoringError, match=r"the monitor of prod\.credit\.credit_default_prod_unpacked: refresh 1 ended FAILED: "
                                              r"Table schema changed: column 'age' is missing"):
        refresh_monitor(w2, settings["table_name"], sleep=lambda s: None)
    stuck, w3 = monitor_service(refresh_states=("RUNNING",) * 100)
    ensure_monitor(w3, settings)
    with pytest.raises(MonitoringError, match=r"refresh 1 did not end within 0 s"):
        refresh_monitor(w3, settings["table_name"], timeout_s=0, sleep=lambda s: None)


def test_a_workspace_check_reads_its_verdict_from_the_monitors_tables(monitor_service, tmp_path):
    """monitor_window with the stand-in monitor, on a local environment's tables (a workspace's are Spark's): the unpacked
    log and the baseline table it writes are what the monitor computes from, and the verdict it reads back from the
    monitor's drift metrics table is the one the local check finds on the same requests."""
    import numpy as np
    import pandas as pd
    from serving_mlops.data import FEATURE_COLUMNS, generate_credit_data
    from serving_mlops.drift import feature_drift, training_baseline, window_buckets
    from serving_mlops.monitoring.lakehouse import monitor_window
    from serving_mlops.monitoring.metric_tables import drift_from_metrics, drift_rows, profile_rows, replace_window_rows
    from serving_mlops.monitoring.requests import MonitoringError
    from serving_mlops.tables import tables_for
    with workspace_home(tmp_path): prod = get_environment("prod")
    tables, categorical = tables_for(prod), ["SEX", "EDUCATION", "MARRIAGE"]
    scored = lambda df: df[FEATURE_COLUMNS].assign(prediction=np.clip((75 - df.AGE) / 60, 0, 1))  # younger: riskier
    baseline = training_baseline(scored(generate_credit_data(3_000, seed=1)), categorical, prediction="prediction")

    def refresh(monitor):  # Databricks' computation, stood in by ours: per granularity window and model version
        log, base = tables.read_pandas(monitor["table_name"]), tables.read_pandas(monitor["baseline_table_name"])
        every = pd.Timedelta(monitor["inference_log"]["granularities"][0])
        for version, rows in log.groupby("model_version"):
            b = training_baseline(base[base.model_version == version].drop(columns="model_version"), categorical, prediction="prediction")
            for start, window in rows.groupby(rows.request_time.dt.floor(every)):
                window = window.reset_index(drop=True)
                replace_window_rows(tables, monitor["profile_metrics_table_name"], profile_rows(window, b, version, start, start + every))
                replace_window_rows(tables, monitor["drift_metrics_table_name"],
                                    drift_rows(window, b, feature_drift(b, window, 0.2, 0.01), version, start, start + every, window_buckets(b, window)))
    service, w = monitor_service(compute=refresh)
    found, frames = {}, {}
    for hour, drift in ((10, 0.0), (11, 1.0)):
        start = pd.Timestamp(f"2026-01-05 {hour}:00", tz="UTC")
        rows = scored(generate_credit_data(1_000, seed=hour, drift=drift, labelled=False))
        frames[hour] = rows.assign(request_time=start + pd.to_timedelta(np.arange(1_000) * 3, "s"), served_entity_name="credit_model-1",
                                   databricks_request_id=[f"r{hour}-{i // 2}" for i in range(1_000)], model_version="1")  # two rows per request
        names, got = monitor_window(prod, "credit-default-prod", frames[hour], {"1": baseline}, start, start + pd.Timedelta("1h"), w=w, refresh_every_s=0)
        ours = feature_drift(baseline, rows, 0.2, 0.01)
        found[hour] = (set(drift_from_metrics(got, 0.2, 0.01).query("drifted").feature), set(ours[ours.drifted].feature))
    assert names == ("prod.credit.credit_default_prod_unpacked_profile_metrics", "prod.credit.credit_default_prod_unpacked_drift_metrics")
    assert found[10] == (set(), set()), found  # like training: nothing, on either side
    theirs, ours = found[11]
    assert {"AGE", "prediction"} <= theirs and len(theirs ^ ours) <= 2, found  # the baseline table's marginals: the same verdict
    # checked again: the log keeps one row per prediction, the baseline table one set per version
    monitor_window(prod, "credit-default-prod", frames[11], {"1": baseline}, pd.Timestamp("2026-01-05 11:00", tz="UTC"),
                   pd.Timestamp("2026-01-05 12:00", tz="UTC"), w=w, refresh_every_s=0)
    assert tables.count("prod.credit.credit_default_prod_unpacked") == 2_000
    assert tables.count("prod.credit.credit_default_prod_unpacked_baseline") == 5_000
    assert sum(method == "POST" and path.endswith("/monitor") for method, path, _ in service.calls) == 1  # created once
    with pytest.raises(MonitoringError, match=r"_drift_metrics has no baseline drift of the window 2026-01-05 10:30:00\+00:00 to "
                                              r"2026-01-05 11:30:00\+00:00: the monitor's granularities are \['1 hour'\]"):
        monitor_window(prod, "credit-default-prod", frames[11], {"1": baseline}, pd.Timestamp("2026-01-05 10:30", tz="UTC"),
                       pd.Timestamp("2026-01-05 11:30", tz="UTC"), w=w, refresh_every_s=0)
