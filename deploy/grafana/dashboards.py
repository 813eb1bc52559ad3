"""tsugiki's Grafana dashboards, as code, built with Grafana's own SDK (grafana-foundation-sdk).

Four dashboards over the metrics the gateway serves at /metrics (one Prometheus job, ``tsugiki``):

- ``tsugiki-overview``: traffic, errors, latency, tokens and the model replicas' engines.
- ``tsugiki-adapter``: one model as clients call it (``$adapter``) and the versions replicas served (``$version``).
- ``tsugiki-drift-noise``: the monitor's drift detectors and the replicas' noisy-input and quality signals.
- ``tsugiki-rollout``: canary weights, rollout stages and decisions, finished rollouts and refreshes.

The JSON under ``dashboards/`` is generated; edit this file, then run ``python deploy/grafana/dashboards.py``
(``--check`` only compares). tests/unit/test_deploy_grafana.py fails when the two disagree.

How the queries are written:

- Rate windows are ``$__rate_interval``; the provisioned datasource sets ``timeInterval`` to the 15 s scrape
  interval, so Grafana makes every window at least four scrapes long.
- Two namespaces of ``adapter``. Gateway metrics label a request with the model *as called*: an alias, an
  adapter name, the base model or ``unknown``. Replica and monitor metrics label it with what was *served*: the
  version key (``support@v2``) for alias traffic, else the adapter or base model name. During a canary one alias
  maps to two versions, and which alias a version serves lives in the registry, not in Prometheus, so the adapter
  dashboard has two independent variables, ``adapter`` for gateway panels and ``version`` for replica panels,
  rather than a regex that guesses one from the other.
- Series that are absent in normal operation (no errors yet, no noisy request, no finished rollout, no refresh)
  get a fallback so the panel shows 0 instead of "No data": ``X or 0 * TOTAL`` where per-label series must stay
  (an error ratio per adapter), ``X or on() vector(0)`` where one 0 will do. Each is marked "fallback:" below.
- Rare-event counters whose series appear at their first increment (finished rollouts, refreshes, drift alarms,
  adapter operations) are shown as counter values, not ``increase()``: ``increase()`` never counts a series'
  first sample, so it would hide, say, the first rollback of every alias. Rollout decisions, counted on every
  controller tick, are shown per interval.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from grafana_foundation_sdk.builders import bargauge, heatmap, prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT_DIR = Path(__file__).resolve().parent / "dashboards"

RATE = "$__rate_interval"
# What the Grafana variables stand for when a query is sent to Prometheus directly (see expand_variables).
PROMQL_DEFAULTS = (("$__rate_interval", "1m"), ("$adapter", ".*"), ("$version", ".*"), ("$alias", ".*"))

_ERRORS = 'outcome=~"client_error|server_error"'
# Version keys are name@vN (tsugiki.adapters.registry.parse_key).
_VERSION_KEY = 'adapter=~".+@v[0-9]+"'


# ---- queries and panels ---------------------------------------------------------------------------------------
class Q(NamedTuple):
    """One PromQL target: the expression and its legend (``{{label}}`` placeholders).

    (A NamedTuple, not a dataclass: dataclasses need the module in sys.modules, and tests load this script by
    path.)
    """

    expr: str
    legend: str = ""


def _ds() -> model.DataSourceRef:
    return model.DataSourceRef(type_val="prometheus", uid="${datasource}")


def _sel(metric: str, *matchers: str) -> str:
    """A series selector: ``metric{m1, m2}``, or the bare name without matchers."""
    ms = ", ".join(m for m in matchers if m)
    return f"{metric}{{{ms}}}" if ms else metric


def _rate(series: str) -> str:
    return f"rate({series}[{RATE}])"


def _quantile(q: float, histogram: str, *, by: str = "", match: str = "") -> str:
    """``histogram_quantile`` of ``histogram`` over ``$__rate_interval``, summed over replicas, per ``by``."""
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({_rate(_sel(histogram + '_bucket', match))}))"


def _flagged_share(match: str = "") -> str:
    """Share of requests with a noise score above 1, per version: 1 - (bucket le=1) / count.

    ``le`` is matched as "1.0" (how prometheus_client and Prometheus 3 write the bound) or "1".
    """
    at_most_1 = _sel("tsugiki_noise_score_bucket", match, 'le=~"1|1.0"')
    return (f"1 - sum by (adapter) ({_rate(at_most_1)})"
            f" / sum by (adapter) ({_rate(_sel('tsugiki_noise_score_count', match))})")


def _error_ratio(errors: str, *, by: str = "", match: str = "") -> str:
    """Share of requests whose outcome matches ``errors``; ``or 0 * total`` keeps a 0 where no error happened
    (an error series exists only after the first such error)."""
    agg = f"sum by ({by}) " if by else "sum"
    err = f"{agg}({_rate(_sel('tsugiki_requests_total', match, errors))})"
    total = f"{agg}({_rate(_sel('tsugiki_requests_total', match))})"
    return f"({err} or 0 * {total}) / {total}"


def _targets(queries: Sequence[Q], *, instant: bool = False,
             fmt: PromQueryFormat | None = None) -> list[cogbuilder.Builder[Any]]:
    out: list[cogbuilder.Builder[Any]] = []
    for i, q in enumerate(queries):
        t = prometheus.Dataquery().expr(q.expr).ref_id(chr(ord("A") + i)).datasource(_ds())
        if q.legend:
            t = t.legend_format(q.legend)
        if instant:
            t = t.instant()
        if fmt is not None:
            t = t.format(fmt)
        out.append(t)
    return out


def _legend() -> common_builders.VizLegendOptions:
    return (common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM).show_legend(True))


def _tooltip() -> common_builders.VizTooltipOptions:
    return common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)


def _timeseries(title: str, description: str, queries: Sequence[Q], *, unit: str = "short", w: int = 8,
                h: int = 8, stacked: bool = False, bars: bool = False, step: bool = False,
                min_val: float | None = None, max_val: float | None = None) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).description(description).datasource(_ds()).targets(_targets(queries))
         .unit(unit).span(w).height(h).legend(_legend()).tooltip(_tooltip()).fill_opacity(10)
         .show_points(common.VisibilityMode.NEVER))
    if stacked:
        p = p.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(60)
    if bars:
        p = p.draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
    if step:
        p = p.line_interpolation(common.LineInterpolation.STEP_AFTER)
    if min_val is not None:
        p = p.min(min_val)
    if max_val is not None:
        p = p.max(max_val)
    return p


def _thresholds(*steps: tuple[float | None, str]) -> dash.ThresholdsConfig:
    return dash.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(
        [model.Threshold(value=v, color=c) for v, c in steps])


def _stat(title: str, description: str, query: Q, *, unit: str = "short",
          thresholds: dash.ThresholdsConfig | None = None) -> stat.Panel:
    p = (stat.Panel().title(title).description(description).datasource(_ds()).targets(_targets([query]))
         .unit(unit).span(4).height(4).graph_mode(common.BigValueGraphMode.AREA)
         .color_mode(common.BigValueColorMode.VALUE)
         .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    return p.thresholds(thresholds or _thresholds((None, "green")))


def _bargauge(title: str, description: str, queries: Sequence[Q], *, unit: str = "short", w: int = 8,
              h: int = 8, max_val: float | None = None) -> bargauge.Panel:
    p = (bargauge.Panel().title(title).description(description).datasource(_ds())
         .targets(_targets(queries, instant=True)).unit(unit).span(w).height(h).min(0)
         .display_mode(common.BarGaugeDisplayMode.GRADIENT).orientation(common.VizOrientation.HORIZONTAL)
         .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
         .thresholds(_thresholds((None, "blue"))))
    if max_val is not None:
        p = p.max(max_val)
    return p


def _state_timeline(title: str, description: str, query: Q, mappings: list[model.ValueMapping], *,
                    w: int = 12, h: int = 8) -> statetimeline.Panel:
    return (statetimeline.Panel().title(title).description(description).datasource(_ds())
            .targets(_targets([query])).span(w).height(h).mappings(mappings)
            .thresholds(_thresholds((None, "blue"))).show_value(common.VisibilityMode.AUTO)
            .merge_values(True).legend(_legend()))


def _value_map(values: Mapping[str, tuple[str, str]]) -> model.ValueMap:
    return model.ValueMap(options={k: model.ValueMappingResult(text=t, color=c, index=i)
                                   for i, (k, (t, c)) in enumerate(values.items())})


# ---- annotations -------------------------------------------------------------------------------------------------
class _PrometheusAnnotationQuery(model.AnnotationQuery):
    """An annotation query with the Prometheus fields the SDK's ``AnnotationQuery`` does not model (Grafana reads
    ``step``, ``titleFormat``, ``tagKeys`` and ``textFormat`` from the annotation itself)."""

    def __init__(self, *, name: str, expr: str, icon_color: str, title_format: str, tag_keys: str,
                 text_format: str, step: str) -> None:
        super().__init__(name=name, datasource=_ds(), enable=True, hide=False, icon_color=icon_color, expr=expr)
        self.title_format, self.tag_keys, self.text_format, self.step = title_format, tag_keys, text_format, step

    def to_json(self) -> dict[str, object]:
        payload = super().to_json()
        payload.update({"step": self.step, "titleFormat": self.title_format, "tagKeys": self.tag_keys,
                        "textFormat": self.text_format, "useValueForTime": False})
        return payload


class _PrometheusAnnotation(cogbuilder.Builder[model.AnnotationQuery]):
    def __init__(self, name: str, expr: str, *, color: str, title: str, tag_keys: str, text: str,
                 step: str = "1m") -> None:
        self._internal = _PrometheusAnnotationQuery(name=name, expr=expr, icon_color=color, title_format=title,
                                                    tag_keys=tag_keys, text_format=text, step=step)

    def build(self) -> model.AnnotationQuery:
        return self._internal


def _annotations(*, adapter_match: str = "") -> list[cogbuilder.Builder[model.AnnotationQuery]]:
    """Rollout stage changes, active drift alarms and firing tsugiki alerts, as events on every time series.

    Stage changes (not ``increase(decisions{action!="wait"})``) mark rollout events because the stage gauge
    exists from the alias's first controller tick, so every advance, promotion and rollback moves it; a
    decision counter appears at its first increment, which ``increase()`` cannot see. Likewise the drift alarm
    gauge (a region while it is active) rather than the alarm counter; the ``ALERTS`` annotation works when the
    alert rules are loaded and is simply empty otherwise.
    """
    alarm = _sel("tsugiki_drift_alarm", adapter_match)
    return [
        # A 2m window at a 1m step: with 1m the change between two evaluations' windows could fall in neither.
        _PrometheusAnnotation("Rollout events", "max by (alias) (changes(tsugiki_rollout_stage[2m])) > 0",
                              color="blue", title="Rollout stage changed: {{alias}}", tag_keys="alias",
                              text="Stage of the rollout on alias {{alias}} changed (advance, promotion, rollback "
                                   "or a new rollout)."),
        _PrometheusAnnotation("Drift alarms", f"max by (adapter) ({alarm}) > 0", color="red",
                              title="Drift alarm: {{adapter}}", tag_keys="adapter",
                              text="The monitor's drift detector for {{adapter}} is in alarm."),
        _PrometheusAnnotation("Firing alerts", 'ALERTS{alertname=~"Tsugiki.*", alertstate="firing"}',
                              color="orange", title="{{alertname}}", tag_keys="alertname,adapter,alias",
                              text="Alert {{alertname}} firing (adapter {{adapter}}, alias {{alias}})."),
    ]


# ---- variables ---------------------------------------------------------------------------------------------------
def _datasource_variable() -> dash.DatasourceVariable:
    return dash.DatasourceVariable("datasource").label("Data source").type("prometheus")


def _query_variable(name: str, label: str, query: str, description: str) -> dash.QueryVariable:
    """A multi-value variable over a label's values, "All" by default (``.*``, so new values need no reload)."""
    return (dash.QueryVariable(name).label(label).description(description).query(query).datasource(_ds())
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(model.VariableOption(text="All", value="$__all", selected=True)))


# ---- dashboards --------------------------------------------------------------------------------------------------
def _dashboard(uid: str, title: str, description: str) -> dash.Dashboard:
    return (dash.Dashboard(title).uid(uid).description(description).tags(["tsugiki"]).editable()
            .time("now-1h", "now").refresh("30s").timezone("browser")
            .tooltip(model.DashboardCursorSync.CROSSHAIR)
            .timepicker(dash.TimePicker().refresh_intervals(["10s", "30s", "1m", "5m", "15m", "1h"]))
            .link(dash.DashboardLink("tsugiki").type(model.DashboardLinkType.DASHBOARDS).tags(["tsugiki"])
                  .as_dropdown(True).include_vars(False).keep_time(True))
            .with_variable(_datasource_variable()))


def overview() -> dash.Dashboard:
    requests = "tsugiki_requests_total"
    total = f"sum({_rate(requests)})"
    d = _dashboard("tsugiki-overview", "tsugiki / Overview",
                   "The gateway's traffic, errors and latency, and the model replicas' engines.")
    d = d.annotations(_annotations())
    d = (d.with_row(dash.Row("At a glance"))
         .with_panel(_stat("Requests/s", "Inference requests per second, all models and outcomes.",
                           Q(total), unit="reqps"))
         # fallback: no error series until the first error.
         .with_panel(_stat("Error ratio", "Share of requests that ended in a client (4xx) or server (5xx) error.",
                           Q(_error_ratio(_ERRORS)),
                           unit="percentunit", thresholds=_thresholds((None, "green"), (0.01, "orange"),
                                                                      (0.05, "red"))))
         .with_panel(_stat("Latency p95", "95th percentile of end-to-end request latency.",
                           Q(_quantile(0.95, "tsugiki_request_latency_seconds")), unit="s"))
         .with_panel(_stat("Model replicas", "Model replicas whose metrics reach the gateway.",
                           Q("count(count by (replica) (tsugiki_queue_depth))")))
         # fallback: the monitor exports drift gauges only for adapters it has seen.
         .with_panel(_stat("Active drift alarms", "Adapter versions whose drift detector is in alarm.",
                           Q("sum(max by (adapter) (tsugiki_drift_alarm)) or on() vector(0)"),
                           thresholds=_thresholds((None, "green"), (1, "red"))))
         # fallback: the comparison drops every alias when no rollout is running.
         .with_panel(_stat("Rollouts in progress", "Aliases with a running rollout (shadow or canary stage).",
                           Q("count(max by (alias) (tsugiki_rollout_stage) >= 0) or on() vector(0)"),
                           thresholds=_thresholds((None, "green"), (1, "blue")))))
    d = (d.with_row(dash.Row("Traffic"))
         .with_panel(_timeseries("Requests/s by outcome", "Inference requests per second by outcome.",
                                 [Q(f"sum by (outcome) ({_rate(requests)})", "{{outcome}}")],
                                 unit="reqps", stacked=True))
         .with_panel(_timeseries("Requests/s by model", "Inference requests per second by the model clients "
                                 "called: alias, adapter, base model or unknown.",
                                 [Q(f"sum by (adapter) ({_rate(requests)})", "{{adapter}}")],
                                 unit="reqps", stacked=True))
         # fallback: no client_error / server_error series until the first such error.
         .with_panel(_timeseries("Error ratio by kind", "Share of requests ending in a client or a server error.",
                                 [Q(_error_ratio('outcome="client_error"'), "client errors (4xx)"),
                                  Q(_error_ratio('outcome="server_error"'), "server errors (5xx)")],
                                 unit="percentunit", min_val=0)))
    d = (d.with_row(dash.Row("Latency and tokens"))
         .with_panel(_timeseries("Request latency", "End-to-end request latency quantiles, all models.",
                                 [Q(_quantile(q, "tsugiki_request_latency_seconds"), f"p{round(q * 100)}")
                                  for q in (0.5, 0.95, 0.99)], unit="s"))
         .with_panel(_timeseries("Time to first token", "Time from request arrival to the first token.",
                                 [Q(_quantile(q, "tsugiki_time_to_first_token_seconds"), f"p{round(q * 100)}")
                                  for q in (0.5, 0.95)], unit="s"))
         .with_panel(_timeseries("Tokens/s", "Prompt tokens processed and completion tokens generated per second.",
                                 [Q(f"sum({_rate('tsugiki_prompt_tokens_total')})", "prompt"),
                                  Q(f"sum({_rate('tsugiki_completion_tokens_total')})", "completion")])))
    d = (d.with_row(dash.Row("Model replicas"))
         .with_panel(_timeseries("Queue depth", "Requests waiting for a batch slot, per model replica.",
                                 [Q("sum by (replica) (tsugiki_queue_depth)", "{{replica}}")], w=6))
         .with_panel(_timeseries("Running sequences", "Sequences in the running batch, per model replica.",
                                 [Q("sum by (replica) (tsugiki_running_sequences)", "{{replica}}")], w=6))
         .with_panel(_timeseries("Batch size", "Sequences per decode forward pass, all replicas.",
                                 [Q(_quantile(q, "tsugiki_batch_size"), f"p{round(q * 100)}") for q in (0.5, 0.95)],
                                 w=6))
         .with_panel(_timeseries("Adapters loaded", "Adapter versions resident in memory, per model replica.",
                                 [Q("sum by (replica) (tsugiki_adapters_loaded)", "{{replica}}")], w=6))
         .with_panel(_timeseries("Forward pass time p95", "95th percentile of prefill and decode-step time.",
                                 [Q(_quantile(0.95, "tsugiki_prefill_seconds"), "prefill"),
                                  Q(_quantile(0.95, "tsugiki_decode_step_seconds"), "decode step")], unit="s"))
         .with_panel(_timeseries("Adapter load time", "Time to make a stored adapter servable (read, check, "
                                 "install); gaps between loads.",
                                 [Q(_quantile(q, "tsugiki_adapter_load_seconds"), f"p{round(q * 100)}")
                                  for q in (0.5, 0.95)], unit="s"))
         # fallback: no series until the first load or unload through the admin API.
         .with_panel(_timeseries("Adapter operations", "Adapter loads and unloads through the admin API by "
                                 "outcome, since the gateway started (a counter value: operations are rare).",
                                 [Q("sum by (op, outcome) (tsugiki_adapter_operations_total) or on() vector(0)",
                                    "{{op}} {{outcome}}")], step=True)))
    return d


def adapter() -> dash.Dashboard:
    called = 'adapter=~"$adapter"'
    served = 'adapter=~"$version"'
    requests = _sel("tsugiki_requests_total", called)
    d = _dashboard("tsugiki-adapter", "tsugiki / Adapter",
                   "One model as clients call it ($adapter: alias, adapter or base model, gateway metrics) and the "
                   "versions the replicas served ($version: version keys such as support@v2 for alias traffic, "
                   "replica and monitor metrics). The two are separate because an alias serves two versions "
                   "during a canary and only the registry knows which.")
    d = (d.with_variable(_query_variable("adapter", "Model (as called)",
                                         "label_values(tsugiki_requests_total, adapter)",
                                         "The model name in requests: alias, adapter, base model or unknown."))
         .with_variable(_query_variable("version", "Version (as served)",
                                        "label_values(tsugiki_output_confidence_logprob_count, adapter)",
                                        "What the replicas served: a version key (name@vN) for alias traffic, "
                                        "else the adapter or base model name."))
         .annotations(_annotations(adapter_match=served)))
    d = (d.with_row(dash.Row("Requests to $adapter (gateway)"))
         .with_panel(_timeseries("Requests/s", "Requests per second by model and outcome.",
                                 [Q(f"sum by (adapter, outcome) ({_rate(requests)})", "{{adapter}} {{outcome}}")],
                                 unit="reqps"))
         # fallback: keeps a 0 per model that has traffic but no errors.
         .with_panel(_timeseries("Error ratio", "Share of each model's requests ending in a 4xx or 5xx error.",
                                 [Q(_error_ratio(_ERRORS, by="adapter", match=called), "{{adapter}}")],
                                 unit="percentunit", min_val=0))
         .with_panel(_timeseries("Request latency", "End-to-end latency quantiles per model.",
                                 [Q(_quantile(q, "tsugiki_request_latency_seconds", by="adapter", match=called),
                                    f"{{{{adapter}}}} p{round(q * 100)}") for q in (0.5, 0.95, 0.99)], unit="s"))
         .with_panel(_timeseries("Token latency p95", "Time to first token and time per output token (after the "
                                 "first), 95th percentile per model.",
                                 [Q(_quantile(0.95, "tsugiki_time_to_first_token_seconds", by="adapter",
                                              match=called), "{{adapter}} first token"),
                                  Q(_quantile(0.95, "tsugiki_time_per_output_token_seconds", by="adapter",
                                              match=called), "{{adapter}} per output token")], unit="s"))
         .with_panel(_timeseries("Tokens/s", "Prompt and completion tokens per second per model.",
                                 [Q(f"sum by (adapter) ({_rate(_sel('tsugiki_prompt_tokens_total', called))})",
                                    "{{adapter}} prompt"),
                                  Q(f"sum by (adapter) ({_rate(_sel('tsugiki_completion_tokens_total', called))})",
                                    "{{adapter}} completion")])))
    d = (d.with_row(dash.Row("Versions served: $version (replicas and monitor)"))
         .with_panel(_timeseries("Output confidence", "Median and 10th percentile of the per-request mean "
                                 "log-probability of the output tokens (closer to 0 is more confident). Quantiles, "
                                 "not a mean: a histogram with negative buckets exports no _sum (OpenMetrics).",
                                 [Q(_quantile(q, "tsugiki_output_confidence_logprob", by="adapter", match=served),
                                    f"{{{{adapter}}}} p{round(q * 100)}") for q in (0.5, 0.1)], max_val=0))
         .with_panel(_timeseries("Noise score", "Per-request noise score quantiles (>= 1 means flagged).",
                                 [Q(_quantile(q, "tsugiki_noise_score", by="adapter", match=served),
                                    f"{{{{adapter}}}} p{round(q * 100)}") for q in (0.5, 0.95)], min_val=0))
         .with_panel(_timeseries("Flagged share", "Share of requests with a noise score above 1 (flagged); a "
                                 "score of exactly 1, also flagged, falls in the le=1 bucket and is not counted.",
                                 [Q(_flagged_share(served), "{{adapter}}")], unit="percentunit", min_val=0, max_val=1))
         # fallback: no series until a request is flagged.
         .with_panel(_timeseries("Noisy requests by reason", "Flagged requests per second by reason (a request "
                                 "can have several).",
                                 [Q(f"sum by (adapter, reason) ({_rate(_sel('tsugiki_noisy_requests_total', served))})"
                                    " or on() vector(0)", "{{adapter}} {{reason}}")], unit="reqps"))
         .with_panel(_timeseries("Drift score vs threshold", "The monitor's CUSUM statistic per version and the "
                                 "threshold at which it raises an alarm.",
                                 [Q(f"max by (adapter) ({_sel('tsugiki_drift_score', served)})", "{{adapter}} score"),
                                  Q(f"max by (adapter) ({_sel('tsugiki_drift_threshold', served)})",
                                    "{{adapter}} threshold")], w=16)
                     .override_by_regexp(".* threshold", [model.DynamicConfigValue(
                         id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})])))
    return d


def drift_noise() -> dash.Dashboard:
    d = _dashboard("tsugiki-drift-noise", "tsugiki / Drift and noise",
                   "Drift detectors of the monitor and per-request noise and quality signals of the model replicas "
                   "(adapter = the version served: name@vN for alias traffic).")
    d = d.annotations(_annotations())
    d = (d.with_row(dash.Row("Drift"))
         .with_panel(_timeseries("Drift score vs threshold", "CUSUM statistic per adapter version (solid) and "
                                 "its alarm threshold (dashed).",
                                 [Q("max by (adapter) (tsugiki_drift_score)", "{{adapter}} score"),
                                  Q("max by (adapter) (tsugiki_drift_threshold)", "{{adapter}} threshold")], w=12)
                     .override_by_regexp(".* threshold", [model.DynamicConfigValue(
                         id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})]))
         .with_panel(_timeseries("Noise-score CUSUM vs threshold", "The second CUSUM of the drift detector: it "
                                 "runs on the ranks of requests' noise scores against the reference's and alarms "
                                 "when a share of the traffic turns noisy together (dense typos, code-switching). "
                                 "Either CUSUM crossing its threshold raises the drift alarm.",
                                 [Q("max by (adapter) (tsugiki_drift_noise_score)", "{{adapter}} score"),
                                  Q("max by (adapter) (tsugiki_drift_noise_threshold)", "{{adapter}} threshold")],
                                 w=12)
                     .override_by_regexp(".* threshold", [model.DynamicConfigValue(
                         id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})]))
         .with_panel(_state_timeline("Drift alarm", "Whether each version's drift alarm is active (until reset).",
                                     Q("max by (adapter) (tsugiki_drift_alarm)", "{{adapter}}"),
                                     [_value_map({"0": ("ok", "green"), "1": ("ALARM", "red")})], w=8))
         .with_panel(_timeseries("Drift alarms raised", "Alarms raised per version since the monitor started: "
                                 "each step up is one alarm (a counter value, because increase() misses a "
                                 "version's first alarm).",
                                 [Q("sum by (adapter) (tsugiki_drift_alarms_total)", "{{adapter}}")], step=True))
         .with_panel(_bargauge("Reference readiness", "Share of each detector's reference profile collected; the "
                               "detector runs at 100%.",
                               [Q("max by (adapter) (tsugiki_drift_reference_ready)", "{{adapter}}")],
                               unit="percentunit", max_val=1))
         .with_panel(_timeseries("Monitor observations/s", "Observations the replicas shipped and dropped (monitor "
                                 "unreachable or behind), and those the monitor processed per version.",
                                 [Q(f"sum by (adapter) ({_rate('tsugiki_monitor_observations_total')})",
                                    "{{adapter}} processed"),
                                  Q(f"sum({_rate('tsugiki_monitor_observations_shipped_total')})", "shipped"),
                                  Q(f"sum({_rate('tsugiki_monitor_observations_dropped_total')})", "dropped")],
                                 w=24)))
    d = (d.with_row(dash.Row("Noise and quality"))
         # fallback: no series until a request is flagged.
         .with_panel(_timeseries("Noisy requests by reason", "Flagged requests per second by reason.",
                                 [Q(f"sum by (reason) ({_rate('tsugiki_noisy_requests_total')}) or on() vector(0)",
                                    "{{reason}}")], unit="reqps", stacked=True))
         .with_panel(_timeseries("Flagged share", "Share of requests with a noise score above 1, per version.",
                                 [Q(_flagged_share(), "{{adapter}}")],
                                 unit="percentunit", min_val=0, max_val=1))
         .with_panel(heatmap.Panel().title("Noise score distribution")
                     .description("Requests per second in each noise score bucket, all versions (>= 1 is flagged).")
                     .datasource(_ds())
                     .targets(_targets([Q(f"sum by (le) ({_rate('tsugiki_noise_score_bucket')})", "{{le}}")],
                                       fmt=PromQueryFormat.HEATMAP))
                     .span(8).height(8).calculate(False)
                     .color(heatmap.HeatmapColorOptions().mode(heatmap_model.HeatmapColorMode.SCHEME).scheme("Oranges")
                            .steps(64))
                     .y_axis(heatmap.YAxisConfig().unit("short"))
                     .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE)))
         .with_panel(_timeseries("Output confidence", "Median per-request mean log-probability of output tokens "
                                 "per version (a histogram with negative buckets exports no _sum, so no mean).",
                                 [Q(_quantile(0.5, "tsugiki_output_confidence_logprob", by="adapter"),
                                    "{{adapter}} p50")], max_val=0))
         # fallback: perplexity is measured on a sampled share of requests (engine prompt_perplexity_sample), so
         # a quiet system may have no sample yet; NaN, not a made-up 0, is what Grafana draws as a gap.
         .with_panel(_timeseries("Prompt perplexity", "Perplexity of prompts under the served model (sampled).",
                                 [Q(_quantile(q, "tsugiki_prompt_perplexity", by="adapter")
                                    + " or on() vector(NaN)", f"{{{{adapter}}}} p{round(q * 100)}")
                                  for q in (0.5, 0.95)]))
         # fallback: no series until an adapter's lexicon corrects a word.
         .with_panel(_timeseries("Words corrected", "Words per second that an adapter's lexicon corrected before "
                                 "the model read them (adapters/lexicon.py), per version: misspelled task words.",
                                 [Q(f"sum by (adapter) ({_rate('tsugiki_corrected_words_total')}) or on() vector(0)",
                                    "{{adapter}}")], min_val=0)))
    return d


def rollout() -> dash.Dashboard:
    alias = 'alias=~"$alias"'
    weights = f"max by (alias, version) ({_sel('tsugiki_rollout_weight', alias)})"
    served = _sel("tsugiki_output_confidence_logprob_count", _VERSION_KEY)
    d = _dashboard("tsugiki-rollout", "tsugiki / Rollouts",
                   "Canary rollouts per alias: traffic weights, stages and the controller's decisions, finished "
                   "rollouts and refreshes (tuning runs started by drift).")
    d = (d.with_variable(_query_variable("alias", "Alias", "label_values(tsugiki_rollout_stage, alias)",
                                         "Aliases the rollout controller knows."))
         .annotations(_annotations()))
    d = (d.with_row(dash.Row("Traffic"))
         .with_panel(_timeseries("Canary weights: $alias", "Share of the alias's traffic routed to each version "
                                 "(stacked: the versions of one alias add up to 1).",
                                 [Q(weights, "{{version}}")],
                                 unit="percentunit", stacked=True, step=True, w=12, min_val=0, max_val=1)
                     .repeat("alias").repeat_direction("h").max_per_row(2))
         .with_panel(_timeseries("Shadow share", "Share of each alias's traffic copied to its shadow version.",
                                 [Q(f"max by (alias) ({_sel('tsugiki_rollout_shadow_share', alias)})", "{{alias}}")],
                                 unit="percentunit", step=True, w=12, min_val=0, max_val=1))
         .with_panel(_timeseries("Requests/s by version served", "Alias traffic as the replicas served it, per "
                                 "version key: the realised canary split.",
                                 [Q(f"sum by (adapter) ({_rate(served)})", "{{adapter}}")],
                                 unit="reqps", stacked=True, w=12))
         .with_panel(table.Panel().title("Current weights")
                     .description("Traffic weight of each version on each alias now.").datasource(_ds())
                     .targets(_targets([Q(weights)],
                                       instant=True, fmt=PromQueryFormat.TABLE))
                     .with_transformation(model.DataTransformerConfig(id_val="organize", options={
                         "excludeByName": {"Time": True}, "renameByName": {"Value": "weight"}}))
                     .override_by_name("weight", [model.DynamicConfigValue(id_val="unit", value="percentunit")])
                     .span(12).height(8)))
    d = (d.with_row(dash.Row("Decisions"))
         .with_panel(_state_timeline("Rollout stage", "-1: no rollout, 0: shadow, N: canary step N.",
                                     Q(f"max by (alias) ({_sel('tsugiki_rollout_stage', alias)})", "{{alias}}"),
                                     [_value_map({"-1": ("none", "transparent"), "0": ("shadow", "purple")})]))
         .with_panel(_timeseries("Decisions", "Controller decisions per interval by action (wait, advance, "
                                 "promote, rollback).",
                                 [Q(f"sum by (alias, action) (increase({_sel('tsugiki_rollout_decisions_total', alias)}"
                                    f"[{RATE}]))", "{{alias}} {{action}}")], bars=True, w=12))
         # fallback: no series until the first rollout finishes.
         .with_panel(_bargauge("Rollouts finished", "Finished rollouts by outcome since the controller started.",
                               [Q(f"sum by (alias, outcome) ({_sel('tsugiki_rollouts_finished_total', alias)})"
                                  " or on() vector(0)", "{{alias}} {{outcome}}")], w=12))
         # fallback: no series until the first refresh is requested.
         .with_panel(_bargauge("Refreshes (tuning runs)", "Refreshes by outcome since the controller started: "
                               "requested, rate_limited, done, rejected (failed the gate), skipped, failed.",
                               [Q(f"sum by (alias, outcome) ({_sel('tsugiki_refreshes_total', alias)})"
                                  " or on() vector(0)", "{{alias}} {{outcome}}")], w=12)))
    return d


# ---- output ------------------------------------------------------------------------------------------------------
def _to_json(builder: dash.Dashboard) -> dict[str, Any]:
    board = builder.build()
    # Stable panel ids (Grafana would number them on load, differently after every edit).
    next_id = 1
    for panel in board.panels or []:
        panel.id_val = next_id
        next_id += 1
    out: dict[str, Any] = json.loads(json.dumps(board, cls=JSONEncoder))
    return out


def build_all() -> dict[str, dict[str, Any]]:
    """Every dashboard as Grafana JSON, by uid."""
    boards = [_to_json(b()) for b in (overview, adapter, drift_noise, rollout)]
    return {b["uid"]: b for b in boards}


def render(board: Mapping[str, Any]) -> str:
    """The committed form: pretty-printed, keys sorted, one trailing newline."""
    return json.dumps(board, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels") or [])  # a collapsed row holds its panels


def panel_queries(board: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of every panel (annotations are not panels)."""
    return [(p.get("title", ""), t["expr"]) for p in _panels(board.get("panels") or [])
            for t in p.get("targets") or [] if t.get("expr")]


def expand_variables(expr: str, values: Mapping[str, str] | None = None) -> str:
    """``expr`` with the Grafana variables replaced, for sending it to Prometheus directly.

    Defaults: ``$__rate_interval`` is 1m (four 15 s scrapes), the label variables match everything (their
    "All"). ``values`` overrides them by variable name, e.g. ``{"$adapter": "support"}``.
    """
    subs = dict(PROMQL_DEFAULTS, **(values or {}))
    out = expr
    for name in sorted(subs, key=len, reverse=True):  # a longer name first: $version before a $v, if ever added
        out = out.replace(name, subs[name])
    left = re.findall(r"\$\w+", out)
    if left:
        raise ValueError(f"no value for Grafana variable(s) {sorted(set(left))} in {expr!r}; pass them in values")
    return out


def write_all(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, board in build_all().items():
        path = out_dir / f"{uid}.json"
        path.write_text(render(board), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="compare with the files in --out; write nothing")
    args = ap.parse_args(argv)
    if args.check:
        stale = [uid for uid, board in build_all().items()
                 if not (args.out / f"{uid}.json").is_file()
                 or (args.out / f"{uid}.json").read_text(encoding="utf-8") != render(board)]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    for path in write_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
