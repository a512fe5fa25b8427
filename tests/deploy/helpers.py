"""Helpers of the deployment tests: the deploy/ files, PromQL selectors and the series a /metrics text holds."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

# How each series of a family type must be read; a family with labels but no sample yet (a counter nobody
# incremented, GPU memory on a CPU box) still has its # TYPE line, so its series are known too.
_SERIES_ROLES = {
    "counter": {"_total": "counter"},
    "histogram": {"_bucket": "bucket", "_sum": "counter", "_count": "counter"},
    "summary": {"": "gauge", "_sum": "counter", "_count": "counter"},
}
_RATE_FUNCTIONS = {"rate", "irate", "increase"}

# Grafana's built-in interval variables; they stand where PromQL wants a duration.
_GRAFANA_INTERVAL = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)$", re.DOTALL)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def exported_series(exposition: str) -> dict[str, str]:
    """Every series name a Prometheus scraping this exposition text (format 0.0.4) can store, with how it
    must be read: "counter" (through rate/increase), "bucket" (histogram_quantile over a rate) or "gauge"."""
    series: dict[str, str] = {}
    for family in text_string_to_metric_families(exposition):
        roles = _SERIES_ROLES.get(family.type, {"": "gauge"})
        series.update({family.name + suffix: role for suffix, role in roles.items()})
        for sample in family.samples:
            series.setdefault(sample.name, "gauge")
    return series


@dataclass(frozen=True)
class Selector:
    """A metric selector of a PromQL expression and the functions it sits in, outermost first."""

    metric: str
    functions: tuple[str, ...]


def selectors(expr: str) -> list[Selector]:
    """The metric selectors of a PromQL expression (ValueError if it does not parse)."""
    found: list[Selector] = []
    calls: list[str] = []

    def enter(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.Call):
            calls.append(node.func.name)
        elif isinstance(node, promql_parser.VectorSelector):
            found.append(Selector(_metric_name(node), tuple(calls)))

    def leave(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.Call):
            calls.pop()

    promql_parser.walk(promql_parser.parse(expr), enter, leave)
    return found


def _metric_name(node: promql_parser.VectorSelector) -> str:
    if node.name:
        return node.name
    for matcher in node.matchers.matchers:
        if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
            return matcher.value
    raise ValueError(f"selector {node} names no single metric")


def misuse(selector: Selector, role: str) -> str | None:
    """Why a selector reads a series of this role wrongly, or None."""
    if role in ("counter", "bucket") and not _RATE_FUNCTIONS & set(selector.functions):
        return f"{selector.metric} only grows: read it through rate() or increase()"
    if role == "bucket" and "histogram_quantile" not in selector.functions:
        return f"{selector.metric} holds histogram buckets: read it through histogram_quantile()"
    return None


def grafana_expr_to_promql(expr: str) -> str:
    """A Grafana Prometheus query as plain PromQL: interval variables become 5m (other variables only
    appear inside label matcher strings, where PromQL takes them as they are)."""
    return _GRAFANA_INTERVAL.sub("5m", expr)


def label_values_selector(query: str) -> str:
    """The series selector of a Grafana ``label_values(selector, label)`` variable query."""
    match = _LABEL_VALUES.match(query.strip())
    if match is None:
        raise ValueError(f"not a label_values(selector, label) query: {query!r}")
    return match["selector"]


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])
