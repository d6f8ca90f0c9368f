"""Workspace-side contracts of training and the registry, against the real MLflow and databricks-sdk clients.

A Databricks workspace cannot exist on this machine. `WorkspaceStandIn` stands in for its REST API: a real
HTTP server on 127.0.0.1 answering the routes the clients call here (MLflow experiments, the Workspace API's
`mkdirs`, the Unity Catalog model registry's `model-versions/search` and `model-versions/get`), the way the
Databricks REST reference documents them, and refusing what a workspace refuses (an experiment whose parent
folder does not exist). What is stood in is that server only: MLflow's `databricks` tracking store, its
Unity Catalog registry store (`UcModelRegistryStore`, which builds `ModelVersionSearch` objects) and
databricks-sdk's `WorkspaceClient` are the real ones, talking HTTP to it.
"""
import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
from conftest import RestStandIn
from mlflow.entities.model_registry.model_version_search import ModelVersionSearch

from serving_mlops.config import get_environment
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
