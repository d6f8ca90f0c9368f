"""The console end to end: a real serving runtime with traffic, the console started through the CLI as a background
process, its JSON over HTTP and its pages in headless Chromium (pages load without console errors, charts drawn with
data that grows under more traffic, the requests page filtered by status, the login). Screenshots of the pages go to
.mlops/console-screenshots/ for a person to look at."""
import math
import os
import subprocess
import time

import httpx
import pytest
from databricks.sdk.service.serving import AiGatewayConfig, AiGatewayInferenceTableConfig

from browser import Page, browser, chart_points
from conftest import BIN, ROOT, cli, expensive
from served import create, entity, invoke, key
from serving_mlops.monitoring.checks import runtime_counters
from serving_mlops.serving.services import service_info

browser = pytest.fixture(scope="module")(expensive(browser))

NAME = "consoleep"  # an endpoint of the credit model with its inference table


def gateway(prefix):
    return AiGatewayConfig(inference_table_config=AiGatewayInferenceTableConfig(catalog_name="dev", schema_name="credit",
                                                                               table_name_prefix=prefix, enabled=True))


SENT = {"ok": 0, "4xx": 0}  # every request this module has sent to NAME, whichever tests ran before (random order too)


def traffic(ws, ok=20, unknown=4, bad=3, spread=0.0):
    "Requests of known customers, of unknown ones (keys_not_found) and malformed ones (4xx; the runtime answers no 5xx to a client's input)."
    sent = {"ok": 0, "4xx": 0}
    with httpx.Client() as client:
        for i in range(ok + unknown):
            r = invoke(ws, NAME, {"dataframe_records": [key(1 + i % 50 if i < ok else 90_000_000 + i)]}, client)
            assert r.status_code == 200, r.text
            sent["ok"] += 1
            time.sleep(spread)
        for _ in range(bad):
            r = invoke(ws, NAME, {"dataframe_records": [{"no_such_key": 1}]}, client)
            assert 400 <= r.status_code < 500, r.text
            sent["4xx"] += 1
    for k, n in sent.items(): SENT[k] += n
    return sent


@pytest.fixture(scope="module")
def console(ws):
    "The console of the served workspace, started by `serving-mlops console --background`; endpoints with inference tables."
    env = ws.env
    create(ws, NAME, entity(ws, ws.v1), ai_gateway=gateway(NAME))
    old = os.environ.get("SERVING_MLOPS_HOME")
    os.environ["SERVING_MLOPS_HOME"] = str(env.root.parent)
    try:
        out = cli("console", "--env", env.name, "--background", "--port", "0", "--no-mlflow-ui").stdout  # its MLflow UI: 14d's example
        info = service_info(env, "console")
        assert info is not None and info["login"] in out and info["url"].startswith("http://127.0.0.1:"), out
        yield {**info, "env": env, "sent": traffic(ws)}
        assert "stopped the console" in cli("console", "--env", env.name, "--stop").stdout
        assert service_info(env, "console") is None
    finally:
        if old is None: os.environ.pop("SERVING_MLOPS_HOME", None)
        else: os.environ["SERVING_MLOPS_HOME"] = old


def bearer(ws): return {"Authorization": f"Bearer {ws.token}"}


def series(console, ws, name=NAME):
    r = httpx.get(f"{console['url']}/api/endpoints/{name}/series", headers=bearer(ws), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(what, check, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value: return value
        if time.monotonic() > deadline: raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


def total(rows, key): return sum(r[key] for r in rows)


def test_unauthenticated_requests_get_401_and_the_login_link_or_the_token_lets_in(console, ws):
    url = console["url"]
    for path in ("/", "/requests", "/monitoring", f"/api/endpoints/{NAME}/series"):
        r = httpx.get(url + path)
        assert r.status_code == 401, path
        assert f"serving-mlops console --env {console['env'].name}" in (r.json()["message"] if path.startswith("/api/") else r.text)
    assert httpx.get(url + "/", headers={"Authorization": "Bearer dapi0000"}).status_code == 401
    assert httpx.get(url + "/login?token=guess").status_code == 401
    assert httpx.get(url + "/", headers=bearer(ws)).status_code == 200
    with httpx.Client() as client:
        r = client.get(console["login"])
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
        page = client.get(url + "/")
        assert page.status_code == 200 and NAME in page.text


def test_series_count_every_request_by_status_and_the_runtime_counters(console, ws):
    sent = dict(SENT)  # the fixture's requests, and any a test that ran earlier sent
    live = wait_for("the inference table's rows", lambda: (s := series(console, ws)["live"]) and total(s, "requests") >= sent["ok"] + sent["4xx"] and s)
    assert total(live, "requests") == sent["ok"] + sent["4xx"] and total(live, "errors_4xx") == sent["4xx"] and total(live, "errors_5xx") == 0
    assert all(r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] for r in live) and {r["served_entity_name"] for r in live} == {f"default_model-{ws.v1}"}
    traffic(ws, ok=6, unknown=0, bad=0)  # the sampler sees model calls between two of its readings
    rows = wait_for("rows per model call", lambda: [r for r in series(console, ws)["rows_per_call"] if r["model_calls"]])
    assert all(r["rows_per_call"] >= 1 for r in rows)
    r = httpx.get(f"{console['url']}/api/endpoints/nope/series", headers=bearer(ws))
    assert r.status_code == 404 and "serving endpoint 'nope' does not exist" in r.json()["message"]
    r = httpx.get(f"{console['url']}/api/endpoints/{NAME}/charts/pie", headers=bearer(ws))
    assert r.status_code == 404 and "expected one of rate, errors, latency, rows, history" in r.json()["message"]
    fig = httpx.get(f"{console['url']}/api/endpoints/{NAME}/charts/latency", headers=bearer(ws)).json()
    assert "Latency (ms" in fig["layout"]["title"]["text"] and len(fig["data"]) == 3
    # the runtime's own latency histogram, which the console's sampler reads for sub-millisecond percentiles (the chart's
    # use of it: 14b's examples): every request counted, in buckets below a millisecond too
    buckets = runtime_counters(ws.env, NAME)[f"default_model-{ws.v1}"]["latency_buckets"]
    assert buckets[math.inf] >= sent["ok"] + sent["4xx"] + 6 and min(buckets) < 0.001, buckets


def test_the_cli_refuses_a_busy_port_and_a_workspace_target(console):
    port = console["url"].rsplit(":", 1)[1]
    r = cli("console", "--env", "staging", "--port", port, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot start the console of environment 'staging' on 127.0.0.1:{port}: the port is in use: the console of environment 'dev'" in r.stderr
    assert "serving-mlops console --env dev --stop" in r.stderr
    r = subprocess.run([str(BIN / "serving-mlops"), "console", "--env", "prod"], capture_output=True, text=True, cwd=ROOT,
                       env={**{k: v for k, v in os.environ.items() if k != "SERVING_MLOPS_HOME"},  # a folder of local workspaces makes every target local
                            "DATABRICKS_HOST": "https://adb-1.azuredatabricks.net"}, timeout=120)
    assert r.returncode == 1 and "Databricks has its own UI" in r.stderr, r.stderr
    assert "--background" in cli("console", "--help").stdout


def test_endpoint_charts_render_and_grow_under_more_traffic(console, ws, browser):
    wait_for("the first requests in the table", lambda: total(series(console, ws)["live"], "requests") > 0)
    page = Page(browser)
    try:
        tab = page.open(console["login"])  # the login link lands on the endpoints page
        assert tab.url.rstrip("/") == console["url"]
        assert "READY" in tab.locator("#endpoints").inner_text()
        for kind in ("rate", "errors", "latency"):
            assert chart_points(tab, f"{kind}-{NAME}") > 0, kind
        before = chart_points(tab, f"latency-{NAME}")
        if chart_points(tab, f"rows-{NAME}") == 0:  # nothing sampled yet: the chart says so instead of an empty frame
            assert "no data in this window yet" in tab.locator(f"#rows-{NAME}").inner_text()
        traffic(ws, ok=24, unknown=0, bad=0, spread=0.5)  # about 12 s: requests in new 10 s windows
        wait_for("the latency chart to grow", lambda: chart_points(tab, f"latency-{NAME}") > before, timeout=40)
        wait_for("the rows per call chart", lambda: chart_points(tab, f"rows-{NAME}") > 0, timeout=30)
        assert "Request rate (requests/s" in tab.locator(f"#rate-{NAME} .gtitle").text_content()
        assert not page.errors, page.errors
        page.screenshot("endpoints")
    finally: page.close()


def test_requests_page_filters_by_status_and_shows_missing_lookups(console, ws, browser):
    sent = console["sent"]
    wait_for("the malformed requests in the table", lambda: total(series(console, ws)["live"], "errors_4xx") >= sent["4xx"])
    page = Page(browser)
    try:
        page.open(console["login"])
        tab = page.open(f"{console['url']}/requests?endpoint={NAME}")
        assert "keys the online feature store did not know" in tab.locator("#missing-lookups").inner_text()
        assert f"<b>{4}</b> of" in tab.locator("#missing-lookups").inner_html()  # the 4 unknown customers of the first traffic
        tab.select_option("#status", "4xx")
        with tab.expect_navigation(): tab.click("#filter button")
        statuses = tab.locator("#requests tbody tr td:nth-child(2)").all_inner_texts()
        assert len(statuses) == sent["4xx"] and all(s.startswith("4") for s in statuses), statuses
        assert "no_such_key" in tab.locator("#requests").inner_text()  # the request body is shown
        tab.select_option("#status", "2xx")
        with tab.expect_navigation(): tab.click("#filter button")
        statuses = tab.locator("#requests tbody tr td:nth-child(2)").all_inner_texts()
        assert statuses and all(s == "200" for s in statuses)
        assert not page.errors, page.errors
        page.screenshot("requests")
    finally: page.close()


def test_a_browser_without_the_login_gets_the_401_page(console, browser):
    tab = browser.new_page()
    try:
        response = tab.goto(console["url"] + "/")
        assert response.status == 401 and "login link" in tab.locator("#login-needed").inner_text()
    finally: tab.close()


def test_the_query_example_is_answered_by_the_endpoint(console, ws, monkeypatch):
    """The endpoints page's "Query this endpoint" (console.endpoints.query_section): the curl body sent as it stands gets
    the endpoint's 200 with a prediction per row, and the Databricks SDK and MLflow deployments examples run as written,
    with the workspace and token the page names (the local runtime's)."""
    import html
    import json
    import re
    page = httpx.get(console["url"] + "/", headers=bearer(ws)).text
    example = {i: html.unescape(re.search(rf'<pre id="query-{NAME}-{i}">(.*?)</pre>', page, re.S).group(1)) for i in range(3)}
    body = re.search(r"-d '(.*)'$", example[0], re.S).group(1)
    assert f"curl -X POST {ws.url}/serving-endpoints/{NAME}/invocations" in example[0]
    r = httpx.post(f"{ws.url}/serving-endpoints/{NAME}/invocations", content=body,
                   headers={**bearer(ws), "Content-Type": "application/json"})
    rows = json.loads(body)["dataframe_records"]
    assert r.status_code == 200 and len(r.json()["predictions"]) == len(rows) > 0, r.text
    assert "snapshot_date" in rows[0] and "customer_id" in rows[0]  # the feature-store model's keys, as its signature needs
    monkeypatch.setenv("DATABRICKS_HOST", ws.url); monkeypatch.setenv("DATABRICKS_TOKEN", ws.token)
    for i in (1, 2):  # as a user pastes them
        space = {}
        code = example[i].replace("w.serving_endpoints.query(", "answer = w.serving_endpoints.query(")
        exec(code.replace('get_deploy_client("databricks").predict(', 'answer = get_deploy_client("databricks").predict('), space)
        got = space["answer"] if i == 1 else space["answer"]["predictions"]
        assert got == r.json()["predictions"], (i, got)


def test_every_chart_marks_when_the_served_version_began(console, ws):
    """Each endpoint chart (its JSON, as the page redraws it) carries a dotted line and "version N" at the time the
    endpoint's served entity began serving (console.endpoints.version_changes, from system.serving.served_entities)."""
    from serving_mlops.console.endpoints import CHARTS
    for kind in CHARTS:
        fig = httpx.get(f"{console['url']}/api/endpoints/{NAME}/charts/{kind}", headers=bearer(ws), timeout=30).json()
        labels = [a["text"] for a in fig["layout"].get("annotations", []) if a["text"].startswith("version ")]
        lines = [s for s in fig["layout"].get("shapes", []) if s.get("line", {}).get("dash") == "dot"]
        assert labels == ["version 1"] and len(lines) == 1, (kind, fig["layout"].get("annotations"))
    # and the page's config history and logs (the SDK's logs and build_logs, answered by the runtime)
    html = httpx.get(f"{console['url']}/", headers=bearer(ws), timeout=30).text
    events = html[html.index(f'id="events-{NAME}"'):]
    assert f'id="config-history-{NAME}"' in events and f"default_model-{ws.v1}: " in events and f" version {ws.v1}" in events, events[:2000]
    assert events.count('<pre class="logs">') == 2 and "could not be read" not in events[:events.index("</details>")], events[:3000]
