"""deploy/grafana/dashboard.json: a Grafana dashboard whose every metric a real server (or agent worker) serves."""
from __future__ import annotations

import json
import re
import urllib.request

import redis
from prometheus_client.parser import text_string_to_metric_families

from .agent_workers import AgentWorker
from .conftest import Api
from .servers import ROOT, free_port, wait_until
from .sse_client import open_stream

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
# What an identifier outside label matchers, ranges and grouping clauses may be besides a metric.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan"}
GRAFANA_VARIABLES = {"$__rate_interval", "$__interval", "$__range"}


def dashboard() -> dict:
    """The dashboard, parsed."""
    return json.loads(DASHBOARD.read_text())


def graph_panels(dash: dict) -> list[dict]:
    """Every panel but the rows (rows' own nested panels included, if collapsed)."""
    out = []
    for panel in dash["panels"]:
        if panel.get("type") == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def exprs(dash: dict) -> list[str]:
    """Every target's PromQL."""
    return [target["expr"] for panel in graph_panels(dash) for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names an expr selects: identifiers that are neither functions, keywords nor label names."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values) out first
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors ([$__rate_interval], [5m])
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def scraped_names(url: str) -> set[str]:
    """The sample names (with _total, _bucket, ... as exposed) of a Prometheus text page."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_dashboard_is_an_importable_grafana_dashboard():
    dash = dashboard()
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["title"] and dash["uid"]
    (ds_input,) = [i for i in dash["__inputs"] if i["name"] == "DS_PROMETHEUS"]
    assert ds_input["type"] == "datasource" and ds_input["pluginId"] == "prometheus"
    panels = graph_panels(dash)
    assert len(panels) >= 11
    ids = [p["id"] for p in dash["panels"]] + [p["id"] for p in panels if p not in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] >= 1, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in panels:
        assert panel["type"] == "timeseries" and panel["title"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert target["expr"].strip(), panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert set(re.findall(r"\$\w+", target["expr"])) <= GRAFANA_VARIABLES, target["expr"]
            assert metric_names(target["expr"]), target["expr"]
    # The server's exposition is not scraped with rates in mind: every rate is over a counter or a bucket.
    for expr in exprs(dash):
        for inner in re.findall(r"rate\(\s*([\w:]+)", expr):
            assert inner.endswith(("_total", "_bucket")), expr


def test_metric_names_are_found_in_exprs():
    assert metric_names('sum by (reason) (rate(openhands_stream_ends_total{reason=~"a|b"}[$__rate_interval]))') \
        == {"openhands_stream_ends_total"}
    assert metric_names("histogram_quantile(0.99, sum by (le, route) (rate(x_bucket[5m]))) / on (route) y") \
        == {"x_bucket", "y"}


def test_every_metric_of_the_dashboard_is_served(start_server, make_key, redis_server, tmp_path):
    server = start_server(workers=2)
    api = Api(server.base, make_key("alice"))
    cid = api.create()
    stream = open_stream(server.port, f"/api/sse/conversations/{cid}/events", {"Authorization": f"Bearer {api.key}"})
    assert stream.status == 200
    port = free_port()
    worker = AgentWorker(redis_server.url, tmp_path / "agent.log", AGENT="echo", AGENT_METRICS_PORT=str(port)).start()
    try:
        api.post(cid, type="user_message", content="hello")
        assert any('"hello"' in event.data for event in stream.take(3)), "the message was delivered"
        # A Redis error, so that its labelled counter has a series: the hub's pub/sub connection (subscribed
        # while the stream is open) cut once.
        killed = 0
        for redis_port in getattr(redis_server, "ports", None) or [redis_server.port]:
            client = redis.Redis(port=redis_port)
            killed += client.client_kill_filter(_type="pubsub")
            client.close()
        assert killed >= 1
        stream.close()
        agent_url = f"http://127.0.0.1:{port}/metrics"
        wanted = set().union(*map(metric_names, exprs(dashboard())))

        def missing() -> set[str]:
            served = scraped_names(server.base + "/metrics") | scraped_names(agent_url)
            return wanted - served

        try:
            wait_until(lambda: not missing(), 20, what="every metric of the dashboard in a scrape")
        except TimeoutError:
            raise AssertionError(f"not served by gunicorn nor the agent worker: {sorted(missing())}") from None
        # Each agent panel reads what agent workers serve (gunicorn counts no agent action).
        assert {"openhands_agent_actions_total", "openhands_agent_action_duration_seconds_bucket"} <= \
            scraped_names(agent_url)
    finally:
        assert worker.stop() == 0

