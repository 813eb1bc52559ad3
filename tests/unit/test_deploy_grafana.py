"""The Grafana dashboards (deploy/grafana): committed JSON in step with the code that builds it, panels that query
Prometheus through the dashboard's datasource variable, and queries limited to metrics tsugiki exports.

Whether every query returns data is checked against a live system in tests/integration, not here.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tsugiki.adapters.controller import RolloutMetrics
from tsugiki.monitoring.metrics import DriftMetrics, RequestQualityMetrics
from tsugiki.serve.metrics import EngineMetrics, GatewayMetrics
from tsugiki.tuning.refresh import RefreshMetrics

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
UIDS = {"tsugiki-overview", "tsugiki-adapter", "tsugiki-drift-noise", "tsugiki-rollout"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The metrics tsugiki exports (family names, as prometheus_client names them: counters without `_total`).
HISTOGRAMS = {
    "tsugiki_request_latency_seconds", "tsugiki_time_to_first_token_seconds", "tsugiki_time_per_output_token_seconds",
    "tsugiki_batch_size", "tsugiki_adapter_load_seconds", "tsugiki_prefill_seconds", "tsugiki_decode_step_seconds",
    "tsugiki_noise_score", "tsugiki_output_confidence_logprob", "tsugiki_prompt_perplexity",
}
COUNTERS = {
    "tsugiki_requests", "tsugiki_prompt_tokens", "tsugiki_completion_tokens", "tsugiki_adapter_operations",
    "tsugiki_noisy_requests", "tsugiki_monitor_observations_shipped", "tsugiki_monitor_observations_dropped",
    "tsugiki_drift_alarms", "tsugiki_monitor_observations", "tsugiki_rollout_decisions", "tsugiki_rollouts_finished",
    "tsugiki_refreshes", "tsugiki_corrected_words",
}
GAUGES = {
    "tsugiki_queue_depth", "tsugiki_running_sequences", "tsugiki_adapters_loaded", "tsugiki_drift_score",
    "tsugiki_drift_threshold", "tsugiki_drift_noise_score", "tsugiki_drift_noise_threshold", "tsugiki_drift_alarm",
    "tsugiki_drift_reference_ready", "tsugiki_rollout_weight",
    "tsugiki_rollout_shadow_share", "tsugiki_rollout_stage",
}
# Series names a query may use: the samples of the families above, and Prometheus's own.
ALLOWED = ({f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
           | {f"{c}_total" for c in COUNTERS} | GAUGES | {"ALERTS", "up"})


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tsugiki_grafana_dashboards", GRAFANA / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboards() -> ModuleType:
    return _load()


@pytest.fixture(scope="module")
def boards(dashboards: ModuleType) -> dict[str, dict[str, Any]]:
    return dashboards.build_all()


def _panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in board["panels"]:
        yield p
        yield from p.get("panels") or []


def _query_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(board) if p["type"] != "row"]


# ---- metric names in PromQL --------------------------------------------------------------------------------------
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "NaN", "Inf"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers left once strings, label matchers, range windows
    and grouping clauses are removed, that are neither function names (followed by "(") nor keywords."""
    s = _GROUPING.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub('""', expr))))
    names = set()
    for m in _IDENT.finditer(s):
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":  # an exponent, as in 1e-09
            continue
        if m.group() in _KEYWORDS or s[m.end():].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def test_metric_names_extracts_selected_series_only() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, adapter) (rate(a_bucket{adapter=~"x|y", le="1.0"}'
            '[$__rate_interval]))) / ignoring(outcome) group_left() sum(b_total offset 5m) or on() vector(NaN)'
            ' > 1e-09 and c')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_allowlist_is_what_tsugiki_exports() -> None:
    # The allowlist above is the documented metric set; the metric classes are what the processes export.
    registry = CollectorRegistry()
    for metrics in (GatewayMetrics, EngineMetrics, RequestQualityMetrics, DriftMetrics, RolloutMetrics,
                    RefreshMetrics):
        metrics(registry)
    exported = {(m.name, m.type) for m in registry.collect()}
    documented = ({(h, "histogram") for h in HISTOGRAMS} | {(c, "counter") for c in COUNTERS}
                  | {(g, "gauge") for g in GAUGES})
    assert exported == documented


# ---- (a) the committed JSON is what the code generates -----------------------------------------------------------
def test_committed_json_equals_generated(dashboards: ModuleType, boards: dict[str, dict[str, Any]]) -> None:
    assert set(boards) == UIDS
    committed = {p.stem for p in (GRAFANA / "dashboards").glob("*.json")}
    assert committed == UIDS, "stale or missing files in deploy/grafana/dashboards"
    for uid, board in boards.items():
        text = (GRAFANA / "dashboards" / f"{uid}.json").read_text(encoding="utf-8")
        assert text == dashboards.render(board), (
            f"deploy/grafana/dashboards/{uid}.json differs from the code; run python deploy/grafana/dashboards.py")


def test_check_mode_reports_stale_files(dashboards: ModuleType, tmp_path: Path) -> None:
    assert dashboards.main(["--check", "--out", str(tmp_path)]) == 1
    assert dashboards.main(["--out", str(tmp_path)]) == 0
    assert dashboards.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "tsugiki-rollout.json").write_text("{}\n")
    assert dashboards.main(["--check", "--out", str(tmp_path)]) == 1


# ---- (b) panels and their targets -------------------------------------------------------------------------------
def test_every_panel_has_a_title_and_queries_through_the_datasource_variable(
        boards: dict[str, dict[str, Any]]) -> None:
    for uid, board in boards.items():
        for p in _query_panels(board):
            where = f"{uid} panel {p.get('title')!r}"
            assert p.get("title"), f"{where}: no title"
            assert p.get("description"), f"{where}: no description"
            assert p["datasource"] == DATASOURCE, where
            targets = p.get("targets") or []
            assert targets, f"{where}: no targets"
            assert all(t.get("expr", "").strip() for t in targets), f"{where}: empty expr"
            assert all(t["datasource"] == DATASOURCE for t in targets), where
            ref_ids = [t["refId"] for t in targets]
            assert len(set(ref_ids)) == len(ref_ids), f"{where}: duplicate refIds {ref_ids}"


def test_panel_queries_lists_every_target(dashboards: ModuleType, boards: dict[str, dict[str, Any]]) -> None:
    for uid, board in boards.items():
        queries = dashboards.panel_queries(board)
        assert len(queries) >= 6, uid
        assert len(queries) == sum(len(p["targets"]) for p in _query_panels(board))
        assert all(title and expr for title, expr in queries)


def test_histogram_quantiles_aggregate_buckets_by_le(dashboards: ModuleType,
                                                     boards: dict[str, dict[str, Any]]) -> None:
    for board in boards.values():
        for title, expr in dashboards.panel_queries(board):
            if "histogram_quantile" in expr:
                assert re.search(r"sum by \(le\b", expr) and "_bucket" in expr, (title, expr)


# ---- (c) only tsugiki's metrics -----------------------------------------------------------------------------------
def _all_exprs(dashboards: ModuleType, board: dict[str, Any]) -> list[tuple[str, str]]:
    return dashboards.panel_queries(board) + [(f"annotation {a['name']}", a["expr"])
                                              for a in board["annotations"]["list"]]


def test_queries_use_only_exported_metrics(dashboards: ModuleType, boards: dict[str, dict[str, Any]]) -> None:
    used: set[str] = set()
    for uid, board in boards.items():
        for title, expr in _all_exprs(dashboards, board):
            names = metric_names(expr)
            assert names, f"{uid} {title!r}: no metric in {expr!r}"
            assert names <= ALLOWED, f"{uid} {title!r}: unknown metric(s) {sorted(names - ALLOWED)} in {expr!r}"
            used |= names
    # Every exported metric is on some dashboard.
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    assert (HISTOGRAMS | COUNTERS | GAUGES) - families == set()


def test_queries_parse_as_promql(dashboards: ModuleType, boards: dict[str, dict[str, Any]],
                                 tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH")
    rules = [{"record": f"tsugiki:dashboard_check_{i}", "expr": dashboards.expand_variables(expr)}
             for i, (_, expr) in enumerate(e for b in boards.values() for e in _all_exprs(dashboards, b))]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_expand_variables(dashboards: ModuleType) -> None:
    expr = 'sum(rate(x{adapter=~"$adapter", v=~"$version"}[$__rate_interval]))'
    assert dashboards.expand_variables(expr) == 'sum(rate(x{adapter=~".*", v=~".*"}[1m]))'
    assert dashboards.expand_variables(expr, {"$adapter": "support", "$__rate_interval": "5m"}) == (
        'sum(rate(x{adapter=~"support", v=~".*"}[5m]))')
    with pytest.raises(ValueError, match=r"no value for Grafana variable\(s\) \['\$tenant'\]"):
        dashboards.expand_variables('x{t="$tenant"}')


# ---- (d) dashboard structure --------------------------------------------------------------------------------------
def test_dashboard_structure(boards: dict[str, dict[str, Any]]) -> None:
    for uid, board in boards.items():
        assert board["uid"] == uid and board["title"].startswith("tsugiki / ")
        assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 39
        assert board["tags"] == ["tsugiki"]
        assert board["refresh"] == "30s"
        assert board["time"] == {"from": "now-1h", "to": "now"}
        panels = list(_panels(board))
        titles = [p["title"] for p in _query_panels(board)]
        assert len(set(titles)) == len(titles), f"{uid}: panel titles repeat (they name the queries in reports)"
        ids = [p["id"] for p in panels]
        assert len(set(ids)) == len(ids) and all(isinstance(i, int) and i > 0 for i in ids), uid
        cells: dict[tuple[int, int], str] = {}
        for p in panels:
            g = p["gridPos"]
            assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")), (uid, p["title"])
            assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, (uid, p["title"], g)
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{uid}: {p['title']!r} overlaps {cells[(x, y)]!r}"
                    cells[(x, y)] = p["title"]


def test_annotations_mark_rollouts_and_drift_alarms(boards: dict[str, dict[str, Any]]) -> None:
    for uid, board in boards.items():
        annotations = board["annotations"]["list"]
        exprs = " ".join(a["expr"] for a in annotations)
        assert "tsugiki_rollout_stage" in exprs and "tsugiki_drift_alarm" in exprs, uid
        for a in annotations:
            assert a["datasource"] == DATASOURCE and a["enable"] is True, (uid, a["name"])
            assert a["titleFormat"] and a["tagKeys"] and a["step"], (uid, a["name"])


# ---- (e) templating -----------------------------------------------------------------------------------------------
def _variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def test_variables(boards: dict[str, dict[str, Any]]) -> None:
    for uid, board in boards.items():
        ds = _variables(board)["datasource"]
        assert ds["type"] == "datasource" and ds["query"] == "prometheus", uid
    adapter = _variables(boards["tsugiki-adapter"])
    assert adapter["adapter"]["query"] == "label_values(tsugiki_requests_total, adapter)"
    assert adapter["version"]["query"] == "label_values(tsugiki_output_confidence_logprob_count, adapter)"
    assert _variables(boards["tsugiki-rollout"])["alias"]["query"] == "label_values(tsugiki_rollout_stage, alias)"
    for v in (adapter["adapter"], adapter["version"]):
        assert v["type"] == "query" and v["datasource"] == DATASOURCE
        assert v["includeAll"] and v["allValue"] == ".*" and v["multi"]


def test_every_variable_used_is_defined(dashboards: ModuleType, boards: dict[str, dict[str, Any]]) -> None:
    for uid, board in boards.items():
        defined = set(_variables(board))
        for title, expr in _all_exprs(dashboards, board):
            used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"}
            assert used <= defined, f"{uid} {title!r}: undefined {sorted(used - defined)}"
    adapter = boards["tsugiki-adapter"]
    exprs = " ".join(e for _, e in dashboards.panel_queries(adapter))
    assert '"$adapter"' in exprs and '"$version"' in exprs


# ---- provisioning -------------------------------------------------------------------------------------------------
def test_provisioning() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (prom,) = ds["datasources"]
    assert prom["uid"] == "prometheus" and prom["type"] == "prometheus"
    assert prom["url"] == "http://prometheus:9090" and prom["isDefault"] is True
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tsugiki.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["folder"] == "tsugiki" and provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/tsugiki"
