"""The console's monitoring, jobs and registry pages on real data: a workspace with a trained, validated champion and a
challenger in its MLflow registry, an hour of clean and an hour of drifted traffic in its inference table, and two runs
of the monitoring job (papermill) that check them: one succeeds, one fails with the drift alert. Pages are loaded in
headless Chromium (no console errors, charts with points, screenshots under .mlops/console-screenshots/) and over plain
HTTP (empty workspaces, damaged run records and notebooks)."""
import json
import shutil
from pathlib import Path

import mlflow
import pytest
from browser import Page, browser, chart_points, drawn, serve_app
from conftest import ROOT, expensive
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from serving_mlops.config import get_environment, using_mlflow, workspace_home
from serving_mlops.console import base, monitor_tables, views
from serving_mlops.jobs import JobFailed, jobs_folder, run_job

browser = pytest.fixture(scope="module")(expensive(browser))
pytestmark = pytest.mark.timeout(1800)  # the first test pays for the workspace: training, validation and two job runs (about 6 min on a busy machine)
CLEAN, DRIFTED = ("2026-01-05 10:00", "2026-01-05 11:00"), ("2026-01-05 11:00", "2026-01-05 12:00")


def console(env) -> Starlette:
    "The views' routes with the plotly.js the console's app serves (the app itself is built elsewhere)."
    js = Route("/static/plotly.min.js", lambda request: Response(base.plotly_js(), media_type="text/javascript"))
    return Starlette(routes=views.routes(env) + monitor_tables.routes(env) + [js])


@pytest.fixture(scope="module")
@expensive
def world(tmp_path_factory):
    "A dev workspace with champion v1 and challenger v2, two hours of traffic, and a successful and a failed monitoring job run."
    from serving_mlops.data import write_credit_data
    from serving_mlops.feature_store import build_feature_tables, example_workspace
    from serving_mlops.ingest import ingest_landing
    from serving_mlops.monitoring.inference import payload_rows, synthetic_entity
    from serving_mlops.naming import inference_table
    from serving_mlops.registry import register_challenger
    from serving_mlops.spark import get_spark
    from serving_mlops.tasks import validate_task
    from serving_mlops.train import feature_columns, train, training_set
    home = tmp_path_factory.mktemp("console") / "workspaces"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SERVING_MLOPS_HOME", str(home)); mp.setenv("SPARK_LOCAL_IP", "127.0.0.1"); mp.chdir(ROOT)
        env, fs = example_workspace(1_500, seed=3, spark=get_spark(), home=home)
        first = train(env, n_trials=1, seed=1, store=fs, progress=False)
        validate_task(env, first.run_id, first.model_uri, seed=1, latency_budget_ms=10_000)  # v1: gate passed, champion
        register_challenger(env, train(env, n_trials=1, seed=2, store=fs, progress=False))  # v2: challenger, not validated
        with using_mlflow(env): model = mlflow.pyfunc.load_model(f"models:/{env.var('model_name')}/1")
        write_credit_data(Path(env.landing_dir) / "drifted.csv", 1_000, seed=12, drift=1.0, first_id=200_001, progress=False)
        ingest_landing(env, progress=False); build_feature_tables(env, fs)
        clients = training_set(env, fs).load_df().toPandas().sort_values("customer_id", ignore_index=True)
        entity = synthetic_entity(env, env.var("endpoint_name"), env.var("model_name"), "1")
        for (start, _), rows in zip((CLEAN, DRIFTED), (clients[clients.customer_id < 200_001], clients[clients.customer_id >= 200_001])):
            X = rows[feature_columns(rows)]
            fs.tables.append(inference_table(env), payload_rows(X, model.predict(rows), entity, start, 3600, keys=rows[["customer_id"]],
                                                                error_share=0.02, seed=1))
        runs = {}
        for name, (start, end) in (("clean", CLEAN), ("drifted", DRIFTED)):
            params = {"start": start, "end": end, "window_minutes": "30", "lag_minutes": "0", "labels_table": "silver_clients"}
            try: runs[name] = run_job(env, "monitoring", params, progress=False)
            except JobFailed: runs[name] = max((d for d in (jobs_folder(env) / "monitoring").iterdir()), key=lambda d: d.stat().st_mtime).name
        yield {"env": env, "clean": runs["clean"].run_id, "drifted": runs["drifted"]}


@pytest.fixture(scope="module")
def url(world):
    with serve_app(console(world["env"])) as u: yield u


def test_the_monitoring_job_runs_made_what_the_pages_show(world):
    env = world["env"]
    run = json.loads((jobs_folder(env) / "monitoring" / world["drifted"] / "run.json").read_text())
    assert [(t["key"], t["state"]) for t in run["tasks"]] == [("metrics", "SUCCESS"), ("drift", "FAILED")], run
    clean = json.loads((jobs_folder(env) / "monitoring" / world["clean"] / "run.json").read_text())
    assert clean["state"] == "SUCCESS" and clean["tasks"][1]["values"]["drifted"] is False, clean  # the task function's own `task` reached it
    assert "DriftAlert" in run["tasks"][1]["error"], run
    frames = views.monitoring_frames(env, env.var("endpoint_name"))
    assert set(frames) == {"drift", "metrics", "quality"} and frames["drift"].drifted.any() and not frames["drift"].drifted.all()


def test_monitoring_page_draws_the_drift_heat_map_and_embeds_the_latest_report(world, url, browser):
    env = world["env"]
    page = Page(browser)
    tab = page.open(f"{url}/monitoring")
    chart = f"drift-{env.var('endpoint_name')}-v1"
    drawn(tab, chart)
    heat = tab.evaluate("id => document.getElementById(id).data[0]", chart)
    assert chart_points(tab, chart) > 0 and len(heat["x"]) == 2 and "age" in heat["y"], heat  # the two hours checked
    crosses = tab.evaluate("id => document.getElementById(id).data[1]", chart)
    assert crosses["y"] and set(crosses["x"]) == {heat["x"][1]}, crosses  # drift only in the second hour
    assert chart_points(tab, f"quality-{env.var('endpoint_name')}") > 0
    report = tab.frame_locator(f"#report-{env.var('endpoint_name')}").locator("img").first
    assert report.get_attribute("src").startswith("data:image/"), "the report's figures are embedded"
    latest = views.drift_reports(env, env.var("endpoint_name"))[0]
    assert latest.name.startswith("drift_20260105T1100_20260105T1200_v1_checked"), latest  # the drifted hour was checked last
    assert tab.locator("#missing-lookups").count() == 1, tab.inner_text("main")  # the drift checks record rows whose keys were not found
    page.screenshot("monitoring")
    page.close()


def test_the_metric_tables_page_draws_drift_over_time_profiles_and_a_column_against_its_baseline(world, url, browser):
    env = world["env"]
    endpoint = env.var("endpoint_name")
    page = Page(browser)
    tab = page.open(f"{url}/monitoring")
    with tab.expect_navigation(wait_until="networkidle"): tab.click(f"#tables-{endpoint}")  # linked from the monitoring page
    charts = [f"drift-series-{endpoint}", f"prediction-drift-{endpoint}", f"profile-{endpoint}", f"histogram-{endpoint}-v1"]
    for chart in charts:
        drawn(tab, chart)
        assert chart_points(tab, chart) > 0, chart
    series = tab.evaluate("id => document.getElementById(id).data", charts[0])
    age = next(t for t in series if t["name"] == "age")
    assert len(age["x"]) == 2 and age["marker"]["symbol"] == ["circle", "x"], age  # the two checked hours: drift in the second
    assert all((y > 0) == (s == "x") for t in series for y, s in zip(t["y"], t["marker"]["symbol"]))  # one rule: mark where past 0
    assert "prediction" not in [t["name"] for t in series]  # the predictions are charted apart
    assert [t["name"] for t in tab.evaluate("id => document.getElementById(id).data", charts[1])] == ["prediction"]
    page.screenshot("monitoring-tables")
    # another column and the first hour, chosen in the form
    tab.select_option("select[name=column]", "age")
    tab.select_option("select[name=window]", index=0)
    with tab.expect_navigation(wait_until="networkidle"): tab.click("#chooser button")
    drawn(tab, charts[3])
    bars = tab.evaluate("id => document.getElementById(id).data", charts[3])
    assert [b["name"] for b in bars] == ["training baseline", "window"] and bars[0]["x"] == bars[1]["x"], bars
    assert abs(sum(bars[1]["y"]) - 1) < 0.01 and "age, 01-05 10:00" in tab.inner_text("main"), bars  # the window's shares
    profile = tab.evaluate("id => document.getElementById(id).data", charts[2])
    assert [t["name"] for t in profile] == ["v1 95th percentile", "v1 5th-95th percentile", "v1 median", "v1 % null"], profile
    page.close()


def test_jobs_page_lists_the_runs_and_a_run_page_shows_its_timeline_and_failing_cell(world, url, browser):
    page = Page(browser)
    tab = page.open(f"{url}/jobs")
    runs = tab.inner_text("#runs-monitoring")
    assert world["clean"] in runs and world["drifted"] in runs and "SUCCESS" in runs and "FAILED" in runs, runs
    assert "no runs yet: `serving-mlops jobs run model_build --env dev`" in tab.inner_text("main")
    page.screenshot("jobs")
    tab = page.open(f"{url}/jobs/monitoring/{world['drifted']}")
    bars = tab.evaluate("() => document.getElementById('timeline').data.map(t => [t.name, t.y])")
    assert sorted((state, y) for state, ys in bars for y in ys) == [("FAILED", "drift"), ("SUCCESS", "metrics")], bars
    assert chart_points(tab, "timeline") == 2
    nodes = tab.evaluate("() => document.getElementById('graph').data.map(t => [t.name, t.text, t.x])")
    assert sorted((state, k, x) for state, ks, xs in nodes for k, x in zip(ks, xs)) == [("FAILED", "drift", 1), ("SUCCESS", "metrics", 0)]
    assert tab.evaluate("() => document.getElementById('graph').layout.annotations.length") == 1  # metrics -> drift
    failure = tab.inner_text("#failure-drift")
    assert f"serving-mlops jobs repair monitoring {world['drifted']} --env dev" in tab.inner_text("#repair")
    assert "DriftAlert" in failure and "run_task(monitoring_task" in tab.inner_text("#failure-drift .failed-cell"), failure
    tasks = tab.inner_text("#tasks")
    assert "start='2026-01-05 11:00'" in tasks and "metrics_windows=2" in tasks, tasks  # parameters and task values
    page.screenshot("jobs-run")
    tab.click("#tasks a:text('notebook') >> nth=1")
    tab.wait_for_load_state("networkidle")
    assert "DriftAlert" in tab.inner_text("body") and not page.errors, page.errors  # rendered offline: no failed requests
    with tab.expect_navigation(wait_until="networkidle"): tab.click("nav.back a")  # and the way back to its run
    assert tab.url == f"{url}/jobs/monitoring/{world['drifted']}", tab.url
    tab = page.open(f"{url}/jobs/monitoring/{world['clean']}")
    mlflow_run = tab.locator("#tasks a[href*='/#/experiments/']")  # the drift check's MLflow run, from the task's values
    assert mlflow_run.count() == 1 and mlflow_run.inner_text().startswith("run "), tab.inner_text("#tasks")
    log = page.open(f"{url}/jobs/monitoring/{world['drifted']}/drift/log").inner_text("#log")
    assert "IPKernelApp" in log and "drift in" in log, log  # the kernel's warnings and the task's own lines
    page.close()


def test_registry_page_shows_versions_aliases_gate_and_lineage(world, url, browser):
    env = world["env"]
    page = Page(browser)
    tab = page.open(f"{url}/registry")
    versions = tab.inner_text("#versions")
    assert "@champion" in versions and "@challenger" in versions and "passed" in versions, versions
    v1 = tab.inner_text("#version-1")
    assert "validation gate: passed" in v1 and "min_roc_auc" in v1 and "latency" in v1, v1
    datasets = tab.inner_text("#datasets-v1")
    assert "dev.credit.silver_clients" in datasets and all(s in datasets for s in ("train", "validation", "test")), datasets
    assert "not validated" in tab.inner_text("#version-2")
    run = tab.locator("#version-1 a.run")
    assert "/#/experiments/" in run.get_attribute("href") and run.inner_text().startswith("train default_model dev"), run.inner_text()
    assert f"MLflow UI: not running; serving-mlops mlflow-ui --env {env.name} --background starts it" in tab.inner_text("#mlflow-ui")
    page.screenshot("registry")  # the links with a running MLflow UI: the console app's example in 14d
    page.close()


def test_pages_of_an_empty_workspace_say_which_command_makes_their_data(tmp_path):
    with workspace_home(tmp_path): env = get_environment("staging")
    client = TestClient(console(env))
    for path, says in [("/monitoring", "no drift checks yet: run `serving-mlops monitor --env staging --endpoint credit-default-staging`"),
                       ("/monitoring", "no model quality yet: it needs labels"),
                       ("/jobs", "no job runs recorded in"), ("/jobs", "`serving-mlops jobs run model_build --env staging`"),
                       ("/registry", "is not registered in environment &#39;staging&#39;: run `serving-mlops train --env staging`"),
                       ("/monitoring/credit-default-staging/tables", "no data yet: staging.credit.credit_default_staging_unpacked_profile_metrics and "
                                                                     "staging.credit.credit_default_staging_unpacked_drift_metrics are written by each drift check")]:
        r = client.get(path)
        assert r.status_code == 200 and says in r.text, (path, says)
    assert client.get("/jobs/model_build/nothing").status_code == 404
    assert client.get("/monitoring/..%2Fetc/tables").status_code == 404
    assert client.get("/jobs/model_build/nothing/train/notebook").status_code == 404


def test_a_damaged_run_record_or_notebook_spoils_only_its_own_line(world, tmp_path):
    env = world["env"]
    with workspace_home(tmp_path): copy = get_environment("dev")
    shutil.copytree(jobs_folder(env), jobs_folder(copy))
    runs = jobs_folder(copy) / "monitoring"
    (runs / world["clean"] / "run.json").write_text('{"job": "monitoring", "tasks": [')  # cut off while written
    (runs / world["drifted"] / "drift.ipynb").write_text("not a notebook")
    client = TestClient(console(copy))
    r = client.get("/jobs")
    assert r.status_code == 200 and world["drifted"] in r.text, r.text
    assert f"run {world['clean']}: {runs / world['clean'] / 'run.json'} is not a run record (JSON)" in r.text, r.text
    r = client.get(f"/jobs/monitoring/{world['clean']}")
    assert r.status_code == 200 and "is not a run record" in r.text
    r = client.get(f"/jobs/monitoring/{world['drifted']}")
    assert r.status_code == 200 and f"executed notebook {runs / world['drifted'] / 'drift.ipynb'} could not be shown" in r.text, r.text
    assert 'id="timeline"' in r.text and "metrics" in r.text  # the other task is still drawn
    r = client.get(f"/jobs/monitoring/{world['drifted']}/drift/notebook")
    assert r.status_code == 200 and "could not be shown" in r.text
    assert client.get("/jobs/%2E%2E/mlflow").status_code == 404  # no way out of the jobs folder
    assert client.get("/monitoring/credit-default-dev/reports/%2E%2E").status_code == 404
