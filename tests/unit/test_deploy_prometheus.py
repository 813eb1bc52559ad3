"""The Prometheus and Alertmanager configuration (deploy/prometheus, deploy/alertmanager): valid for promtool
(and amtool where it is installed), rules that only use metrics tsugiki exports, every alert unit-tested both
firing and silent, documented in the runbook, and routed the way the gateway's webhook expects.

promtool comes with the Debian package `prometheus`, which CI installs; without it these tests fail rather
than skip, so a missing tool cannot pass for valid configuration.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tsugiki.adapters.controller import RolloutMetrics
from tsugiki.config import ControllerConfig
from tsugiki.monitoring.metrics import DriftMetrics, RequestQualityMetrics
from tsugiki.serve.metrics import EngineMetrics, GatewayMetrics
from tsugiki.tuning.refresh import RefreshMetrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = Path("deploy/prometheus")  # relative to ROOT, where the tools run, so their messages stay short
ALERTS = ROOT / PROMETHEUS / "rules" / "alerts.yml"
RECORDING = ROOT / PROMETHEUS / "rules" / "recording.yml"
RULE_TESTS = ROOT / PROMETHEUS / "tests" / "alerts_test.yml"
ALERTMANAGER = Path("deploy/alertmanager/alertmanager.yml")
RUNBOOK = ROOT / "deploy" / "README.md"
RUNBOOK_URL = "https://github.com/tsugiki/tsugiki/blob/main/deploy/README.md#"
SEVERITIES = {"page", "ticket", "info"}
GATEWAY_RECEIVER, HUMANS = "tsugiki-gateway", "humans"


def _run(*cmd: str) -> str:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (f"`{' '.join(cmd)}` exited with {res.returncode}\n"
                                 f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res.stdout


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: install the Debian package `prometheus` "
                    "(apt-get install prometheus), as CI does")
    return path


def _yaml(path: Path) -> Any:
    return yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))


def _rules(path: Path, kind: str) -> list[dict[str, Any]]:
    return [r for g in _yaml(path)["groups"] for r in g["rules"] if kind in r]


# ---- promtool ----------------------------------------------------------------------------------------------------
def test_prometheus_config_and_its_rule_files_are_valid() -> None:
    out = _run(_promtool(), "check", "config", "--lint=all", "--lint-fatal", str(PROMETHEUS / "prometheus.yml"))
    # check config checks the rule files it names; make sure it found both
    assert "2 rule files found" in out, out


def test_rule_files_are_valid() -> None:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / PROMETHEUS / "rules").glob("*.yml"))
    assert files == [str(PROMETHEUS / "rules" / "alerts.yml"), str(PROMETHEUS / "rules" / "recording.yml")]
    _run(_promtool(), "check", "rules", "--lint=all", "--lint-fatal", *files)


def test_alert_unit_tests_pass() -> None:
    _run(_promtool(), "test", "rules", str(PROMETHEUS / "tests" / "alerts_test.yml"))


# ---- what the rules refer to -------------------------------------------------------------------------------------
def _exported_series() -> set[str]:
    """Every series name the tsugiki processes export, from the metric classes themselves."""
    registry = CollectorRegistry()
    for metrics in (GatewayMetrics, EngineMetrics, RequestQualityMetrics, DriftMetrics, RolloutMetrics,
                    RefreshMetrics):
        metrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {m.name + s for m in registry.collect() for s in suffixes[m.type]}


# a raw tsugiki series, not part of a recorded name (level:metric:operations)
_RAW = re.compile(r"(?<![\w:])tsugiki_\w+(?![\w:])")
_RECORDED = re.compile(r"(?<![\w:])\w+:\w+:\w+(?![\w:])")


def test_rules_use_only_exported_metrics_and_defined_recordings() -> None:
    exported = _exported_series()
    recorded = {r["record"] for r in _rules(RECORDING, "record")}
    unknown = {(r.get("record") or r["alert"], name) for r in _rules(RECORDING, "record") + _rules(ALERTS, "alert")
               for name in _RAW.findall(r["expr"]) if name not in exported}
    assert not unknown, f"rules query series tsugiki does not export: {sorted(unknown)}"
    undefined = {(r["alert"], name) for r in _rules(ALERTS, "alert") for name in _RECORDED.findall(r["expr"])
                 if name not in recorded}
    assert not undefined, f"alerts use recorded series that recording.yml does not define: {sorted(undefined)}"


# ---- alerts: documented and tested -------------------------------------------------------------------------------
def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    alerts = _rules(ALERTS, "alert")
    assert alerts
    problems = []
    for rule in alerts:
        name, annotations = rule["alert"], rule.get("annotations") or {}
        missing = [k for k in ("summary", "description", "runbook_url") if not str(annotations.get(k, "")).strip()]
        if missing:
            problems.append(f"{name} has no {', '.join(missing)}")
        severity = (rule.get("labels") or {}).get("severity")
        if severity not in SEVERITIES:
            problems.append(f"{name} has severity {severity!r}; use one of {sorted(SEVERITIES)}")
        if annotations.get("runbook_url") != RUNBOOK_URL + name.lower():
            problems.append(f"{name}'s runbook_url is {annotations.get('runbook_url')!r}, "
                            f"expected {RUNBOOK_URL + name.lower()!r}")
    assert not problems, "\n".join(problems)


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    firing, silent = set(), set()
    for test in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]:
        for case in test.get("alert_rule_test") or []:
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = {r["alert"] for r in _rules(ALERTS, "alert")}
    assert not alerts - firing, f"no case where these alerts fire: {sorted(alerts - firing)}"
    assert not alerts - silent, f"no case where these alerts stay silent: {sorted(alerts - silent)}"
    assert not (firing | silent) - alerts, f"tests of alerts that do not exist: {sorted((firing | silent) - alerts)}"


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lowercase, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_runbook_url_points_at_a_runbook_section() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.MULTILINE)
    assert "Alerts and runbooks" in headings
    anchors = {_github_anchor(h) for h in headings}
    missing = {r["alert"]: urlparse(r["annotations"]["runbook_url"]).fragment for r in _rules(ALERTS, "alert")
               if urlparse(r["annotations"]["runbook_url"]).fragment not in anchors}
    assert not missing, f"runbook_url anchors without a heading in {RUNBOOK.name}: {missing}"


# ---- Alertmanager ------------------------------------------------------------------------------------------------
_MATCHER = re.compile(r'^\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*$')


def _matches(matcher: str, labels: dict[str, str]) -> bool:
    m = _MATCHER.match(matcher)
    assert m is not None, f'matcher {matcher!r} is not of the form name="value" (with =, !=, =~ or !~)'
    name, op, value = m.groups()
    have = labels.get(name, "")
    if op in ("=", "!="):
        return (have == value) == (op == "=")
    return (re.fullmatch(value, have) is not None) == (op == "=~")  # Alertmanager anchors regexes


def _receivers(route: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Alertmanager's routing: a route that matches offers the alert to its children in order, going on past a
    matching child only if that child has `continue`; its own receiver gets the alert only when no child does.
    Children inherit the receiver they do not set."""
    assert not {"match", "match_re"} & set(route), "use `matchers`, not the deprecated match/match_re"
    if not all(_matches(m, labels) for m in route.get("matchers", [])):
        return []
    out: list[str] = []
    for child in route.get("routes", []):
        got = _receivers({"receiver": route["receiver"], **child}, labels)
        out += got
        if got and not child.get("continue", False):
            break
    return out or [route["receiver"]]


def _alert_labels(rule: dict[str, Any], **from_expr: str) -> dict[str, str]:
    return {"alertname": rule["alert"], **(rule.get("labels") or {}), **from_expr}


def test_alertmanager_routes_drift_to_the_gateway_and_everything_to_humans() -> None:
    cfg = _yaml(ALERTMANAGER)
    route = cfg["route"]
    assert route["receiver"] == HUMANS
    assert {"alertname", "alias", "adapter"} <= set(route["group_by"])
    by_name = {r["alert"]: r for r in _rules(ALERTS, "alert")}
    drift = _alert_labels(by_name["TsugikiDriftDetected"], adapter="support@v2")
    assert _receivers(route, drift) == [GATEWAY_RECEIVER, HUMANS]
    for rule in _rules(ALERTS, "alert"):
        to_gateway = (rule.get("labels") or {}).get("tsugiki_action") == "refresh"
        want = [GATEWAY_RECEIVER, HUMANS] if to_gateway else [HUMANS]
        assert _receivers(route, _alert_labels(rule, adapter="a", alias="a")) == want, rule["alert"]
        # the gateway requests refreshes only for the alert names it is configured with
        if to_gateway:
            assert rule["alert"] in ControllerConfig().refresh_alerts, rule["alert"]


def test_gateway_receiver_is_the_authenticated_webhook() -> None:
    receivers = {r["name"]: r for r in _yaml(ALERTMANAGER)["receivers"]}
    assert set(receivers) == {GATEWAY_RECEIVER, HUMANS}
    (hook,) = receivers[GATEWAY_RECEIVER]["webhook_configs"]
    assert urlparse(hook["url"]).path == "/v1/alerts/alertmanager"
    assert hook["send_resolved"] is True
    auth = hook["http_config"]["authorization"]
    assert auth.get("type", "Bearer") == "Bearer"   # Alertmanager's default type is Bearer
    assert auth["credentials_file"].startswith("/")
    assert "credentials" not in auth, "keep the admin key out of the config: use credentials_file"


def test_alertmanager_config_passes_amtool() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool is not installed (Debian package prometheus-alertmanager); the structure and routing "
                    "are checked by the tests above")
    _run(amtool, "check-config", str(ALERTMANAGER))
    # and Alertmanager's own router agrees with the routing checked above
    _run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}",
         f"--verify.receivers={GATEWAY_RECEIVER},{HUMANS}",
         "alertname=TsugikiDriftDetected", "tsugiki_action=refresh", "adapter=support@v2", "severity=ticket")
    _run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", f"--verify.receivers={HUMANS}",
         "alertname=TsugikiHighErrorRate", "adapter=support", "severity=page")
