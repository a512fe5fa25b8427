"""deploy/prometheus and deploy/grafana: well-formed rules and dashboard whose PromQL parses and reads only
series the real server exports, each the way its type allows.

PromQL is parsed by promql-parser (a binding of GreptimeDB's Rust PromQL parser): it rejects syntax errors,
unknown functions and argument type errors (rate() of an instant vector). No maintained Python validator of
Grafana dashboard JSON exists (grafana-foundation-sdk only builds dashboards and decodes without checking),
so the dashboard's structure is checked here.
"""

from __future__ import annotations

import json
import re
from typing import Any

import promql_parser
import pytest

from tests.deploy.helpers import (
    DEPLOY,
    Selector,
    dashboard_panels,
    grafana_expr_to_promql,
    label_values_selector,
    load_yaml_documents,
    misuse,
    selectors,
)

# Series Prometheus itself writes for every target; the server cannot export them.
PROMETHEUS_SERIES = {"up": "gauge"}
SEVERITIES = {"critical", "warning", "info"}
_RULE_FIELDS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
_ALERT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GRAFANA_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}")


def _alert_rules() -> list[dict[str, Any]]:
    (rule_file,) = load_yaml_documents(DEPLOY / "prometheus" / "alerts.yaml")
    return [rule for group in rule_file["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())


def _dashboard_queries() -> list[tuple[str, str, bool]]:
    """(where, PromQL, whether it reads values) of every panel target and every query variable (which
    only looks up label values) of the dashboard."""
    dashboard = _dashboard()
    queries = [
        (f"panel {panel['title']!r} target {target['refId']}", grafana_expr_to_promql(target["expr"]), True)
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    queries += [
        (f"variable {variable['name']}", label_values_selector(variable["query"]["query"]), False)
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    return queries


def _adapter_rules() -> list[dict[str, Any]]:
    (config,) = load_yaml_documents(DEPLOY / "prometheus" / "adapter-rules.yaml")
    return config["rules"]


def _adapter_metrics_query(rule: dict[str, Any], series: str) -> str:
    """The adapter's metricsQuery with its Go template fields filled in as the adapter would."""
    fields = {"<<.Series>>": series, "<<.LabelMatchers>>": 'namespace="default",pod=~"a|b"', "<<.GroupBy>>": "pod"}
    return re.sub("|".join(map(re.escape, fields)), lambda m: fields[m[0]], rule["metricsQuery"])


def _adapter_name(rule: dict[str, Any]) -> str:
    """The custom-metrics name prometheus-adapter gives the rule's series (Go regexp ${1} -> Python \\1)."""
    (series,) = {s.metric for s in selectors(rule["seriesQuery"])}
    replacement = re.sub(r"\$\{(\d+)\}|\$(\d+)", lambda m: "\\" + (m[1] or m[2]), rule["name"]["as"])
    return re.sub(rule["name"]["matches"], replacement, series, count=1)


def _all_queries() -> list[tuple[str, str, bool]]:
    """(where, PromQL, whether it reads values rather than only finding series) of every deploy/ query."""
    queries = [(f"alert {rule['alert']}", rule["expr"], True) for rule in _alert_rules()]
    queries += _dashboard_queries()
    for rule in _adapter_rules():
        queries.append(("adapter seriesQuery", rule["seriesQuery"], False))
        (series,) = {s.metric for s in selectors(rule["seriesQuery"])}
        queries.append(("adapter metricsQuery", _adapter_metrics_query(rule, series), True))
    return queries


def test_alert_rule_file_structure():
    (rule_file,) = load_yaml_documents(DEPLOY / "prometheus" / "alerts.yaml")
    assert set(rule_file) == {"groups"}
    groups = rule_file["groups"]
    assert groups and len({group["name"] for group in groups}) == len(groups)
    names = [rule["alert"] for rule in _alert_rules()]
    assert len(set(names)) == len(names), "alert names must be unique"
    for rule in _alert_rules():
        name = rule["alert"]
        assert set(rule) <= _RULE_FIELDS and {"alert", "expr", "for", "labels", "annotations"} <= set(rule), name
        assert _ALERT_NAME.match(name), name
        assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0, name
        assert rule["labels"]["severity"] in SEVERITIES, name
        for field in ("summary", "description"):
            text = rule["annotations"][field]
            assert text.strip(), f"{name}: empty {field}"
            assert text.count("{{") == text.count("}}"), f"{name}: unbalanced template in {field}"


@pytest.mark.parametrize("where, expr", [pytest.param(w, e, id=w) for w, e, _ in _all_queries()])
def test_promql_parses(where: str, expr: str):
    promql_parser.parse(expr)  # raises ValueError naming the problem


def test_dashboard_structure():
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] and dashboard["title"]
    panels = list(dashboard_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids), "panel ids must be unique"

    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    boxes = []
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("h", "w", "x", "y")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        boxes.append((panel["title"], grid))
        if panel["type"] == "row":
            continue
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no query"
        assert len({target["refId"] for target in targets}) == len(targets), panel["title"]
        for target in targets:
            for source in (panel["datasource"], target["datasource"]):
                assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            used = {a or b for a, b in _GRAFANA_VARIABLE.findall(target["expr"])} - {"__rate_interval", "__interval"}
            assert used <= variables, f"panel {panel['title']!r} uses undefined variables {used - variables}"

    for index, (title, a) in enumerate(boxes):  # no two panels overlap on the 24-column grid
        for other, b in boxes[index + 1:]:
            apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                     or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])
            assert apart, f"panels {title!r} and {other!r} overlap"


def test_every_metric_used_is_exported_by_the_server(server_series: dict[str, str]):
    """Dashboard, alerts, adapter rule and HPA read only series of the real /metrics, the way each series'
    type allows (counters through rate/increase, buckets through histogram_quantile): renaming a metric
    in vllm_layered/serving/metrics.py fails here."""
    known = {**server_series, **PROMETHEUS_SERIES}
    problems = []
    for where, expr, reads_values in _all_queries():
        for selector in selectors(expr):
            if selector.metric not in known:
                problems.append(f"{where}: {selector.metric} is not exported")
            elif reads_values and (reason := misuse(selector, known[selector.metric])):
                problems.append(f"{where}: {reason}")

    (hpa,) = load_yaml_documents(DEPLOY / "kubernetes" / "hpa.yaml")
    adapter_names = {_adapter_name(rule) for rule in _adapter_rules()}
    for metric in hpa["spec"]["metrics"]:
        name = metric[metric["type"].lower()]["metric"]["name"]
        if known.get(name) != "gauge":
            problems.append(f"HPA: {name} is not an exported gauge")
        if name not in adapter_names:
            problems.append(f"HPA: no prometheus-adapter rule serves {name} (it serves {sorted(adapter_names)})")
    assert not problems, "\n".join(problems)


def test_the_selector_checks_are_not_vacuous():
    """Raw counters and buckets are reported, and a selector by __name__ still yields its metric."""
    series = {"vllm_layered:api_requests_total": "counter", "vllm_layered:step_time_seconds_bucket": "bucket"}
    (raw,) = selectors("vllm_layered:api_requests_total > 0")
    assert misuse(raw, series[raw.metric])
    (bucket,) = selectors("sum by (le) (rate(vllm_layered:step_time_seconds_bucket[5m]))")
    assert misuse(bucket, series[bucket.metric])
    (good,) = selectors("histogram_quantile(0.9, sum by (le) (rate(vllm_layered:step_time_seconds_bucket[5m])))")
    assert misuse(good, series[good.metric]) is None
    assert selectors('{__name__="vllm_layered:renamed"}') == [Selector("vllm_layered:renamed", ())]

