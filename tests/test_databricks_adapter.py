"""The Databricks feature-store adapter, with the real databricks-feature-engineering package (the
optional extra `databricks`, which `make test` installs).

A Databricks workspace cannot exist on this machine, so FeatureEngineeringClient itself is replaced by
a recorder of calls (RecordingClient) in the adapter tests: what is checked is that the adapter calls
it with the arguments Databricks documents, and builds the real FeatureLookup objects.
"""
import pytest

fe = pytest.importorskip("databricks.feature_engineering")

from serving_mlops.config import get_environment
from serving_mlops.feature_store import (DatabricksFeatureStore, FeatureLookup, FeatureStoreError, LocalFeatureStore,
                                         databricks_lookup, feature_store_for)


def test_builds_real_feature_lookups():
    ours = FeatureLookup("prod.credit.behaviour_features", "customer_id", ["recent_delay", "utilisation_mean_6m"],
                         rename_outputs={"recent_delay": "delay"}, timestamp_lookup_key="snapshot_date")
    theirs = databricks_lookup(ours)
    assert isinstance(theirs, fe.FeatureLookup)
    assert theirs.table_name == "prod.credit.behaviour_features"
    assert theirs.lookup_key == "customer_id"
    assert theirs.feature_names == ["recent_delay", "utilisation_mean_6m"]
    assert theirs._rename_outputs == {"recent_delay": "delay"}
    assert theirs._get_output_name("recent_delay") == "delay" and theirs._get_output_name("utilisation_mean_6m") == "utilisation_mean_6m"
    assert theirs.timestamp_lookup_key == "snapshot_date"
    multi = databricks_lookup(FeatureLookup("prod.credit.t", ["customer_id", "account_id"]))
    assert multi.lookup_key == ["customer_id", "account_id"] and multi.feature_names == []  # []: every feature


class RecordingClient:
    "Stands in for FeatureEngineeringClient (needs a workspace): records each call's keyword arguments."
    def __init__(self): self.calls = []

    def get_table(self, name):
        "Answers with the package's real FeatureTable entity, as the client does after create_table."
        from databricks.ml_features.entities.feature_table import FeatureTable
        self.calls.append(("get_table", {"name": name}))
        return FeatureTable(name=name, table_id="1", description="d", primary_keys=["customer_id", "snapshot_date"],
                            partition_columns=[], features=["customer_id", "snapshot_date", "recent_delay"],
                            timestamp_keys=["snapshot_date"], tags={"produced_by": "job"})

    def __getattr__(self, method):
        def call(**kwargs):
            self.calls.append((method, kwargs))
            return f"{method} result"
        return call


@pytest.fixture
def workspace_env(tmp_path, monkeypatch):
    bundle = tmp_path / "databricks.yml"
    bundle.write_text("""
variables:
  catalog: {default: prod}
  schema: {default: credit}
  online_store_name: {default: credit-online}
targets:
  prod: {workspace: {host: "https://example.cloud.databricks.com"}}
""")
    return get_environment("prod", bundle)


def test_adapter_calls_the_client_as_databricks_documents(workspace_env):
    client = RecordingClient()
    store = DatabricksFeatureStore(workspace_env, client=client)
    lookups = [FeatureLookup("prod.credit.behaviour_features", "customer_id", ["recent_delay"], timestamp_lookup_key="snapshot_date")]
    assert store.create_training_set("labels-df", lookups, label="label", exclude_columns=["snapshot_date"]) == "create_training_set result"
    method, kwargs = client.calls[-1]
    assert method == "create_training_set" and kwargs["df"] == "labels-df" and kwargs["label"] == "label"
    assert kwargs["exclude_columns"] == ["snapshot_date"]
    assert [type(l) for l in kwargs["feature_lookups"]] == [fe.FeatureLookup]
    assert kwargs["feature_lookups"][0].timestamp_lookup_key == "snapshot_date"

    store.write_table("prod.credit.behaviour_features", "df")
    assert client.calls[-1] == ("write_table", {"name": "prod.credit.behaviour_features", "df": "df", "mode": "merge"})
    with pytest.raises(FeatureStoreError, match="mode='merge' only"):
        store.write_table("prod.credit.behaviour_features", "df", mode="overwrite")
    store.score_batch("models:/prod.credit.default_model@champion", "keys-df")
    assert client.calls[-1] == ("score_batch", {"model_uri": "models:/prod.credit.default_model@champion", "df": "keys-df", "result_type": "double"})


def test_timeseries_column_joins_the_primary_key(workspace_env):
    client = RecordingClient()
    store = DatabricksFeatureStore(workspace_env, client=client)
    table = store.create_table("prod.credit.behaviour_features", "customer_id", "df", timeseries_column="snapshot_date",
                               description="d", produced_by="job")
    method, kwargs = client.calls[0]
    assert method == "create_table"
    assert kwargs["primary_keys"] == ["customer_id", "snapshot_date"] and kwargs["timeseries_column"] == "snapshot_date"
    assert kwargs["tags"] == {"produced_by": "job"}
    assert (table.primary_keys, table.timeseries_column, table.features, table.produced_by) == (["customer_id"], "snapshot_date", ["recent_delay"], "job")


def test_local_targets_get_the_local_store(workspace_env):
    assert isinstance(feature_store_for(get_environment("dev")), LocalFeatureStore)
    with pytest.raises(Exception):  # a real client cannot be built without workspace credentials
        feature_store_for(workspace_env).client.get_table(name="prod.credit.x")
