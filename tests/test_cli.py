"""The `serving-mlops` commands as users run them, on real files and real Delta tables: in process (typer's CliRunner), and
the installed console script as a separate process once per command family (here `--help`; serve, jobs and ingest in their modules)."""
import pytest
from conftest import ROOT, cli, expensive

from serving_mlops.config import get_environment
from serving_mlops.data import generate_credit_data
from serving_mlops.tables import tables_for

COMMANDS = ["env", "generate", "ingest", "features", "train", "validate", "promote", "tables", "serve", "deploy", "endpoints", "query", "console",
            "mlflow-ui"]


def test_help_explains_every_command():
    from typer.testing import CliRunner
    from serving_mlops.cli import app
    out = cli("--help", process=True).stdout  # the installed command, as a process
    for command in COMMANDS:
        assert command in out
        sub = CliRunner().invoke(app, [command, "--help"]).output  # each command's help, in process (a process each costs 1.5 s)
        assert "--env" in sub, f"{command} has no --env"


def test_mlflow_ui_stop_without_one_and_a_workspace_target_are_answered_plainly(home, monkeypatch):
    assert "no MLflow UI of 'dev' is running" in cli("mlflow-ui", "--env", "dev", "--stop").stdout
    monkeypatch.delenv("SERVING_MLOPS_HOME")  # a folder of local workspaces makes every target local
    monkeypatch.setenv("DATABRICKS_HOST", "https://adb-1.azuredatabricks.net")  # every target without a host is that workspace
    r = cli("mlflow-ui", "--env", "prod", "--background", check=False)
    assert r.returncode == 1 and "Databricks has its own UI" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_generate_ingest_and_reingest_is_idempotent(home):
    cli("generate", "--env", "dev", "--rows", "3000", "--seed", "5", "--bad-fraction", "0.01")
    out = cli("ingest", "--env", "dev").stdout
    assert "3000 rows" in out
    env = get_environment("dev")
    assert env.root == (home / "dev").resolve()
    tables = tables_for(env)
    counts = {n: tables.count(n) for n in tables.list("dev", "credit")}
    bronze, quarantine = counts["dev.credit.bronze_clients"], counts["dev.credit.quarantine_clients"]
    silver, statements = counts["dev.credit.silver_clients"], counts["dev.credit.silver_statements"]
    assert bronze == 3000 and 0 < quarantine < 100
    assert silver == bronze - quarantine and statements == 6 * silver
    reasons = tables.read_pandas("dev.credit.quarantine_clients").reason
    assert reasons.str.contains(r"is not|is outside|is missing|occurs 2 times").all()

    cli("ingest", "--env", "dev")
    assert {n: tables.count(n) for n in tables.list("dev", "credit")} == counts
    assert tables.read_pandas("dev.credit.silver_clients").customer_id.is_unique


def test_environments_do_not_share_state(home):
    cli("generate", "--env", "staging", "--rows", "200")
    cli("ingest", "--env", "staging")
    assert tables_for(get_environment("staging")).list() == [
        f"staging.credit.{t}" for t in ("bronze_clients", "quarantine_clients", "silver_clients", "silver_statements")]
    assert tables_for(get_environment("dev")).list() == []
    assert "no tables yet" in cli("tables", "--env", "prod").stdout


def test_bad_input_is_a_clear_error_and_writes_nothing(home, tmp_path):
    path = tmp_path / "no_limit.csv"
    generate_credit_data(50).drop(columns=["LIMIT_BAL"]).to_csv(path, index=False)
    proc = cli("ingest", "--env", "dev", str(path), check=False)
    assert proc.returncode == 1
    assert f"{path}: missing column(s) LIMIT_BAL" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tables_for(get_environment("dev")).list() == []

    proc = cli("tables", "--env", "qa", check=False)
    assert proc.returncode == 1 and "unknown environment 'qa'" in proc.stderr


def test_too_many_bad_rows_fail_the_ingest(home, tmp_path):
    path = tmp_path / "dirty.csv"
    cli("generate", "--env", "prod", "--rows", "1000", "--bad-fraction", "0.2", "--output", str(path))
    proc = cli("ingest", "--env", "prod", str(path), check=False)
    assert proc.returncode == 1
    assert "more than ingest_max_bad_fraction=0.01 of environment 'prod'" in proc.stderr
    tables = tables_for(get_environment("prod"))
    assert not tables.exists("prod.credit.silver_clients")
    assert tables.count("prod.credit.quarantine_clients") > 100


def test_parquet_inference_batch(home, tmp_path):
    path = tmp_path / "batch.parquet"
    cli("generate", "--env", "dev", "--rows", "300", "--kind", "inference", "--first-id", "100001", "--output", str(path))
    cli("ingest", "--env", "dev", str(path), "--unlabelled", "--snapshot-date", "2005-11-01")
    silver = tables_for(get_environment("dev")).read_pandas("dev.credit.silver_clients")
    assert len(silver) == 300 and silver.default_next_month.isna().all()
    assert (silver.snapshot_date.astype(str) == "2005-11-01").all()


@pytest.fixture(scope="module")
@expensive
def two_targets(tmp_path_factory):
    """Staging with a validated champion trained on 1,500 clients, prod with its own 300 clients and feature tables (not
    published), and whether promoting before prod had feature tables was refused as it should be."""
    from serving_mlops.tasks import features_task, ingest_task, train_task, validate_task
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SERVING_MLOPS_HOME", str(tmp_path_factory.mktemp("two_targets") / "workspaces"))
        mp.setenv("SPARK_LOCAL_IP", "127.0.0.1"); mp.setenv("BUNDLE_VAR_serving_port", "0"); mp.chdir(ROOT)  # free ports: `make demo`'s runtimes may hold 8712, 8713
        staging = get_environment("staging")  # its champion, made in process by the task functions the commands call
        cli("generate", "--env", "staging", "--rows", "1500")
        ingest_task(staging); features_task(staging, publish=False)
        trained = train_task(staging, n_trials=1)
        validate_task(staging, trained["run_id"], trained["model_uri"], latency_budget_ms=10_000)
        early = cli("promote", "--from", "staging", "--env", "prod", check=False)  # the copy would look its features up in prod's tables
        prod = get_environment("prod")
        cli("generate", "--env", "prod", "--rows", "300")
        ingest_task(prod); features_task(prod, publish=False)
        yield staging, prod, trained, early


@pytest.mark.slow
def test_promote_copies_once_and_verifies(two_targets):
    "The scenario's step 6 from a shell: staging champion -> prod registry, idempotent."
    staging, prod, trained, proc = two_targets
    assert proc.returncode == 1 and "feature table prod.credit.behaviour_features (the model's staging.credit.behaviour_features) does not exist" in proc.stderr
    first = cli("promote", "--from", "staging", "--env", "prod").stdout
    assert "staging.credit.default_model version 1 of 'staging' is prod.credit.default_model version 1 of 'prod'" in first
    assert "identical predictions" in first and "its gate in 'staging': passed" in first
    again = cli("promote", "--from", "staging", "--env", "prod").stdout
    assert "prod.credit.default_model version 1" in again  # no second copy
    # issue 29: a version whose gate never ran is refused, unless forced with a reason (recorded)
    import mlflow
    from serving_mlops.config import using_mlflow
    from serving_mlops.registry import alias_version, registry_client
    with using_mlflow(staging): unchecked = mlflow.register_model(trained["model_uri"], staging.model_name).version
    proc = cli("promote", "--from", "staging", "--env", "prod", "--version", str(unchecked), check=False)
    assert proc.returncode == 1 and f"version {unchecked} of 'staging' did not pass its validation gate (validation.status: never validated" in proc.stderr, proc.stderr
    assert "--force" in proc.stderr and str(alias_version(prod, "champion").version) == "1"  # nothing moved
    forced = cli("promote", "--from", "staging", "--env", "prod", "--version", str(unchecked), "--force", "demo of a forced promotion").stdout
    assert "its gate in 'staging': never validated (forced: demo of a forced promotion)" in forced, forced
    copy = registry_client(prod).get_model_version(prod.model_name, alias_version(prod, "champion").version)
    assert copy.tags["promotion.forced_reason"] == "demo of a forced promotion" and copy.tags["promotion.forced_by"]
    proc = cli("promote", "--from", "dev", "--env", "prod", check=False)
    assert proc.returncode == 1 and "no version with alias 'champion'" in proc.stderr


@pytest.mark.slow
def test_a_feature_added_in_staging_only_never_reaches_prod_clients(two_targets, monkeypatch):
    """Issue 29's broken path, replayed: prod serves staging's champion to a client calling by keys (as `query` does);
    staging adds a feature, trains, and the gate fails the version. Its promotion is refused; forced, its copy is refused by
    the deploy job's function before traffic moves (prod's feature table lacks the column) and the endpoint keeps its
    version; pushed past that check through the SDK, as on a workspace where no check runs first, the runtime does not load
    it and the endpoint keeps serving. The client never sees anything but a 200."""
    import re
    import threading
    import httpx
    from pyspark.sql import functions as F
    import serving_mlops.features as features
    from serving_mlops.deploy import DeploymentFailed, deploy_and_test, wait_not_updating
    from serving_mlops.feature_store import feature_store_for
    from serving_mlops.registry import GateFailed, alias_version
    from serving_mlops.serving.app import serving_token
    from serving_mlops.serving.services import start_server, stop_server, workspace_client
    from serving_mlops.tasks import features_task, train_task, validate_task
    from databricks.sdk.errors import OperationFailed
    from databricks.sdk.service.serving import ServedEntityInput
    from datetime import timedelta
    staging, prod, _, _ = two_targets
    store = feature_store_for(prod)
    for t in ("behaviour_features", "demographic_features"): store.publish_table(prod.table_name(t))
    copied = cli("promote", "--from", "staging", "--env", "prod").stdout  # staging's champion (the copy made once)
    served = re.search(r"is prod\.credit\.default_model version (\d+) of 'prod'", copied).group(1)
    url = start_server(prod)["url"]
    statuses, stop = [], threading.Event()
    def client():  # a real caller: keys only, the target's snapshot date, all the time
        body = {"dataframe_records": [{"customer_id": c, "snapshot_date": prod.var("snapshot_date")} for c in (1, 2, 3)]}
        with httpx.Client(headers={"Authorization": f"Bearer {serving_token(prod)}"}, timeout=30) as http:
            while not stop.is_set():
                statuses.append(http.post(f"{url}/serving-endpoints/{prod.endpoint_name}/invocations", json=body).status_code)
                stop.wait(0.05)
    caller = threading.Thread(target=client)
    try:
        deploy_and_test(prod, served, requests=5)
        caller.start()
        # staging only: a new feature (the notebook edit of docs/data-and-features.md), a model trained with it, a failed gate
        built = features.customer_features
        monkeypatch.setattr(features, "customer_features", lambda clients, statements: {
            **(f := built(clients, statements)), "behaviour_features": f["behaviour_features"].withColumn("pay_ratio_min_6m", F.col("pay_ratio_1m") / 2)})
        assert "added pay_ratio_min_6m" in cli("features", "--env", "staging").stdout
        trained = train_task(staging, n_trials=1)
        with pytest.raises(GateFailed, match="failed the validation gate: latency"):  # a budget no model meets: the gate fails the version
            validate_task(staging, trained["run_id"], trained["model_uri"], latency_budget_ms=1e-6)
        failed = str(alias_version(staging, "challenger").version)  # the version the gate failed (the champion did not move)
        proc = cli("promote", "--from", "staging", "--env", "prod", "--version", failed, check=False)
        assert proc.returncode == 1 and f"version {failed} of 'staging' did not pass its validation gate (validation.status: failed" in proc.stderr, proc.stderr
        forced = cli("promote", "--from", "staging", "--env", "prod", "--version", failed, "--force", "trying the broken path").stdout
        copy = re.search(r"is prod\.credit\.default_model version (\d+) of 'prod'", forced).group(1)
        with pytest.raises(DeploymentFailed) as refused:  # the deploy job's own function: stopped before any traffic moved
            deploy_and_test(prod, copy, requests=5)
        assert "looks up ['pay_ratio_min_6m'] in the online table prod.credit.behaviour_features, which has no such column" in str(refused.value)
        w = workspace_client(prod)
        assert [e.entity_version for e in w.serving_endpoints.get(prod.endpoint_name).config.served_entities] == [served]
        # past that check, through the SDK: Model Serving's own load decides, and the runtime's refuses it
        w.serving_endpoints.update_config(prod.endpoint_name, served_entities=[ServedEntityInput(entity_name=prod.model_name, entity_version=copy)])
        with pytest.raises(OperationFailed):
            wait_not_updating(w, prod.endpoint_name, timedelta(minutes=5))
        ep = w.serving_endpoints.get(prod.endpoint_name)
        assert [e.entity_version for e in ep.config.served_entities] == [served] and ep.state.ready.value == "READY"
        assert "pay_ratio_min_6m" in (ep.pending_config.served_entities[0].state.deployment_state_message or ""), ep.pending_config
        stop.wait(0.5)
    finally:
        stop.set()
        if caller.is_alive(): caller.join()
        stop_server(prod)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))  # every call, before, during and after: answered


def test_jobs_run_refuses_a_parameter_no_task_takes_and_runs_nothing(home):
    proc = cli("jobs", "run", "model_build", "--env", "staging", "-p", "bogus=1", check=False)
    assert proc.returncode != 0
    assert "job model_build has no parameter 'bogus'; its tasks take: " in proc.stderr + proc.stdout
    assert "max_bad_fraction (ingest)" in proc.stderr + proc.stdout  # the valid names, with the tasks that take them
    assert not (home / "staging" / "jobs").exists() or not any((home / "staging" / "jobs").rglob("run.json"))


@pytest.mark.slow
def test_jobs_runs_lists_the_runs_made_newest_first_with_their_states(home):
    from pathlib import Path
    from serving_mlops.data import write_credit_data
    staging = get_environment("staging")
    assert "no runs of job ingest recorded in " in cli("jobs", "runs", "--env", "staging", "--job", "ingest").stdout
    write_credit_data(Path(staging.landing_dir) / "clients.csv", 300, seed=3, progress=False)
    cli("jobs", "run", "ingest", "--env", "staging")
    write_credit_data(Path(staging.landing_dir) / "clients.csv", 300, seed=4, progress=False, bad_fraction=0.3)
    assert cli("jobs", "run", "ingest", "--env", "staging", check=False).returncode == 1
    lines = cli("jobs", "runs", "--env", "staging", "--job", "ingest").stdout.splitlines()
    runs = sorted(p.name for p in (staging.root / "jobs" / "ingest").iterdir())  # run ids begin with their start time
    assert len(lines) == 4 and lines[0].startswith(f"ingest run {runs[1]} (staging): FAILED, started 20") and lines[1].startswith("  ingest FAILED 0:")
    assert lines[2].startswith(f"ingest run {runs[0]} (staging): SUCCESS, started 20") and lines[3].startswith("  ingest SUCCESS 0:")
    assert cli("jobs", "runs", "--env", "staging").stdout.splitlines() == lines  # every job's runs: only ingest ran
    assert cli("jobs", "runs", "--env", "staging", "--last", "1").stdout.splitlines()[:2] == lines[:2]
    proc = cli("jobs", "runs", "--env", "staging", "--job", "ingset", check=False)
    assert proc.returncode == 1 and "no job 'ingset' in the bundle" in proc.stderr


@pytest.mark.slow
def test_features_rebuild_rewrites_a_named_table_and_refuses_an_unknown_one(home):
    "The deliberate way to drop or retype a feature, as a user types it (what it changes: nbs/05_feature_store's examples)."
    cli("generate", "--env", "dev", "--rows", "300", "--seed", "5")
    cli("ingest", "--env", "dev")
    cli("features", "--env", "dev")
    env = get_environment("dev")
    version = tables_for(env).version("dev.credit.behaviour_features")
    r = cli("features", "--env", "dev", "--rebuild", "behaviour", check=False)
    assert r.returncode == 1 and "no feature table(s) ['behaviour'] to rebuild in environment 'dev': its feature tables are " \
        "['behaviour_features', 'demographic_features']" in r.stderr, r.stderr
    assert tables_for(env).version("dev.credit.behaviour_features") == version  # nothing was written
    out = cli("features", "--env", "dev", "--rebuild", "behaviour_features").stdout
    assert f"rebuilt dev.credit.behaviour_features (version {version + 1}): same columns; earlier versions keep their columns" in out, out
    assert "dev.credit.behaviour_features: 300 rows, 13 features" in out and "online: 300 keys" in out, out
    assert "rebuilt dev.credit.demographic_features" not in out


def test_deploying_a_version_the_registry_does_not_have_starts_nothing(home):
    "A deploy checks the version before it starts anything: no local serving runtime is left running for a failed deploy."
    from serving_mlops.config import get_environment
    from serving_mlops.serving.services import server_info
    r = cli("deploy", "--env", "dev", "--version", "7", check=False)
    assert r.returncode == 1 and "model dev.credit.default_model of environment 'dev' has no version 7" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert server_info(get_environment("dev")) is None
