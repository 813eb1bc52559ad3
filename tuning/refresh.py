"""Refresh on drift: turn an alias's original data plus its captured, labelled recent traffic into a new candidate.

A refresh is requested (by the monitor's drift alarm, an Alertmanager webhook or an operator) as a row in the
registry, which allows one requested-or-running refresh per alias at a time. Running it:

1. **Assemble data.** The stable version's training data (its ``tuning_config["data_path"]``) plus every captured
   request of the alias that has feedback with a label (or a preferred output), as tuning records. With fewer
   than ``min_labelled`` labelled captures newer than the stable version there is nothing new to learn from: the
   refresh ends ``skipped`` with the counts (an event and a metric), instead of training on nothing.
2. **Tune** with the robust, partial tuning job (:mod:`tsugiki.tuning.job`), on Ray with declared resources, the
   stable version as the incumbent of the regression gate. The assembled file's path is recorded before
   training starts and the job's run id is a hash of its name, config and data, so a refresh interrupted by a
   controller restart reruns into the same checkpoint directory and resumes.
3. **Register** a passing candidate in the registry with its lineage (parent version, data hash, config, gate
   report); a failing one ends ``rejected`` with its report. The caller (the controller) starts the rollout.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from tsugiki.adapters.registry import Refresh, Registry, VersionState, parse_key
from tsugiki.config import RefreshConfig, default_home
from tsugiki.tuning.config import TuneConfig
from tsugiki.tuning.data import read_examples, text_of_label_prompt

logger = logging.getLogger(__name__)


class RefreshMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.refreshes = Counter("tsugiki_refreshes", "Refreshes by outcome (done, rejected, skipped, failed, "
                                 "requested, rate_limited).", ["alias", "outcome"], **kw)


def _records_from_captures(captures: list[Any]) -> list[dict[str, str]]:
    """Tuning records from labelled captures. Feedback comes from callers: a label the tuning data format
    refuses (blank, several lines) or an empty prompt is left out rather than failing the whole refresh."""
    out = []
    for c in captures:
        label = (c.label or "").strip()
        if not c.prompt.strip():
            continue
        if label and "\n" not in label:
            text = text_of_label_prompt(c.prompt)
            if text is not None and text.strip():
                out.append({"text": text, "label": label})
            else:
                out.append({"prompt": c.prompt, "completion": " " + label})
        elif c.preferred and c.preferred.strip():
            out.append({"prompt": c.prompt, "completion": c.preferred})
    return out


class Refresher:
    """Runs refreshes recorded in the registry.

    Args:
        registry: the shared registry.
        config: refresh settings.
        tune_runner: ``tune_runner(cfg, data_path, name, **kw) -> dict`` (a TuneResult as a dict); default: the
            tuning job as a Ray task (:func:`tsugiki.tuning.job.submit`), waited for.
        base_fingerprint: the served base model's fingerprint (recorded on registered versions).
    """

    def __init__(self, registry: Registry, config: RefreshConfig | None = None, *,
                 tune_runner: Callable[..., dict[str, Any]] | None = None, base_fingerprint: str = "",
                 metrics: RefreshMetrics | None = None, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.config = config or RefreshConfig()
        self.tune_runner = tune_runner or _ray_runner
        self.base_fingerprint = base_fingerprint
        self.metrics = metrics or RefreshMetrics(CollectorRegistry())
        self.clock = clock

    def work_dir(self) -> Path:
        return (self.config.work_dir or default_home() / "refresh").expanduser().resolve()

    # ---- requests --------------------------------------------------------------------------------------------
    def request(self, alias: str, *, reason: str, source: str, force: bool = False) -> dict[str, Any]:
        """Ask for a refresh (idempotent while one is active; rate-limited by ``cooldown_s`` unless ``force``)."""
        if not self.config.enabled and not force:
            return {"alias": alias, "accepted": False, "why": "refresh is disabled (refresh.enabled)"}
        rollout = self.registry.get_rollout(alias)
        if rollout is not None and not force:
            # mid-rollout the alias's traffic is already moving to a retrained version: judge that one first
            self.metrics.refreshes.labels(alias, "rate_limited").inc()
            return {"alias": alias, "accepted": False,
                    "why": f"rollout {rollout.id} of {rollout.candidate} is {rollout.state.value}; refresh after it "
                           "ends"}
        active = self.registry.refreshes(alias, active_only=True)
        if active:
            return {"alias": alias, "accepted": False, "refresh": active[-1].id,
                    "why": f"refresh {active[-1].id} is already {active[-1].state}"}
        if not force:  # a skipped refresh trained nothing: it does not hold the next one back
            done = [r for r in self.registry.refreshes(alias) if not r.active and r.state != "skipped"]
            if done and self.clock() - done[-1].updated < self.config.cooldown_s:
                wait = self.config.cooldown_s - (self.clock() - done[-1].updated)
                self.metrics.refreshes.labels(alias, "rate_limited").inc()
                return {"alias": alias, "accepted": False,
                        "why": f"refresh {done[-1].id} finished {self.clock() - done[-1].updated:.0f} s ago; "
                               f"next one allowed in {wait:.0f} s (refresh.cooldown_s)"}
        ref, new = self.registry.request_refresh(alias, reason=reason, source=source)  # refuses unknown aliases
        for outcome in ("done", "rejected", "skipped", "failed"):  # at 0, so the first failure is an increase
            self.metrics.refreshes.labels(alias, outcome)
        if new:
            self.metrics.refreshes.labels(alias, "requested").inc()
        return {"alias": alias, "accepted": new, "refresh": ref.id, "state": ref.state}

    # ---- running ---------------------------------------------------------------------------------------------
    def pending(self) -> list[Refresh]:
        """Refreshes to run: requested ones, and running ones a previous controller did not finish."""
        return self.registry.refreshes(active_only=True)

    def assemble(self, ref: Refresh) -> dict[str, Any]:
        """Write the refresh's training file; returns ``{"data_path", "stable", "counts"}`` or raises
        :class:`NotEnoughData`."""
        out = self.work_dir() / ref.alias / str(ref.id)
        path = out / "train.jsonl"
        if path.is_file() and ref.detail.get("data_path") == str(path) and ref.detail.get("stable"):
            # a resumed refresh trains on exactly the data it started with, even where captures have aged out of
            # the alias's retention since (re-counting them could skip a run that was half trained)
            read_examples(path)
            return {"data_path": str(path), "stable": ref.detail["stable"], "counts": ref.detail.get("counts", {})}
        alias = self.registry.get_alias(ref.alias)
        stable_keys = [k for k, w in alias.routes.items() if w >= 1.0 - 1e-9]
        if len(stable_keys) != 1:
            raise NotEnoughData(f"alias {ref.alias!r} is mid-rollout ({alias.routes}); refresh after it finishes")
        stable = self.registry.get(*parse_key(stable_keys[0]))
        orig_path = stable.tuning_config.get("data_path")
        original: list[dict[str, str]] = []
        if not orig_path:
            logger.warning("stable version registered without its training data: the refresh trains on labelled "
                           "captures only", extra={"alias": ref.alias, "stable": stable.key})
        elif not Path(orig_path).is_file():
            # training on the captures alone would forget every intent the traffic did not bring back, and the gate
            # would not see it (its validation data would come from the captures too)
            raise FileNotFoundError(f"{stable.key}'s training data {orig_path} is not a readable file here; a "
                                    "refresh retrains on it and the labelled captures: make it reachable from the "
                                    "controller (on a cluster, a shared volume) and request the refresh again")
        else:
            # split on "\n" only, as the data reader does: str.splitlines() also splits inside JSON strings at
            # U+2028, U+2029 and U+0085, which a captured prompt may contain raw
            original = [json.loads(line) for line in Path(orig_path).read_text(encoding="utf-8").split("\n")
                        if line.strip()]
        # every labelled capture the stable version did not train on: not only those since it was made, but also
        # those captured while its own refresh trained and old ones labelled late (its data file holds the ones
        # it used, so they are not counted twice)
        seen = {json.dumps(r, sort_keys=True) for r in original}
        new = [r for r in _records_from_captures(self.registry.captures(ref.alias, labelled_only=True))
               if json.dumps(r, sort_keys=True) not in seen][-self.config.max_captures:]
        counts = {"original": len(original), "labelled_captures": len(new), "min_labelled": self.config.min_labelled}
        if len(new) < self.config.min_labelled:
            raise NotEnoughData(f"{len(new)} labelled captures of {ref.alias!r} that {stable.key} did not train on, "
                                f"{self.config.min_labelled} needed (refresh.min_labelled); turn capture on for the "
                                "alias and send feedback with labels", counts=counts)
        out.mkdir(parents=True, exist_ok=True)
        if not path.is_file():  # (a file left by a run that stopped before it was recorded as running is kept)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in original + new),
                           encoding="utf-8")
            tmp.replace(path)
        read_examples(path)  # validate now: a bad record names its line before any training
        return {"data_path": str(path), "stable": stable.key, "counts": counts}

    def run(self, ref: Refresh, *, progress: bool = False) -> Refresh:
        """Run one refresh to its end state (blocking: minutes; call it from a worker thread). Whatever goes
        wrong ends the refresh ``failed`` with the error: a refresh never stays active to block the next."""
        try:
            return self._run(ref, progress=progress)
        except Exception as e:  # a failed refresh is an outcome, not a controller crash
            self.metrics.refreshes.labels(ref.alias, "failed").inc()
            logger.exception("refresh failed", extra={"alias": ref.alias, "refresh": ref.id})
            return self.registry.update_refresh(ref.id, state="failed", detail={"error": f"{type(e).__name__}: {e}"})

    def _run(self, ref: Refresh, *, progress: bool) -> Refresh:
        try:
            plan = self.assemble(ref)
        except NotEnoughData as e:
            self.metrics.refreshes.labels(ref.alias, "skipped").inc()
            logger.warning("refresh skipped", extra={"alias": ref.alias, "why": str(e)})
            return self.registry.update_refresh(ref.id, state="skipped", detail={"why": str(e), "counts": e.counts})
        ref = self.registry.update_refresh(ref.id, state="running", detail=plan)
        stable = self.registry.get(*parse_key(plan["stable"]))
        cfg = TuneConfig(**{**stable.tuning_config.get("tune", {}), **self.config.tune})
        with _incumbent(self.registry, stable.name, stable.version, self.work_dir()) as inc:
            result = self.tune_runner(cfg, plan["data_path"], stable.name, incumbent_dir=str(inc),
                                      timeout_s=self.config.timeout_s,
                                      to_store=False, work_dir=str(self.work_dir() / "jobs"), progress=progress)
        gate = result.get("gate", {})
        if result.get("status") != "passed":
            self.metrics.refreshes.labels(ref.alias, "rejected").inc()
            return self.registry.update_refresh(ref.id, state="rejected", detail={
                "why": "; ".join(gate.get("failures", [])) or "the gate failed", "gate": gate,
                "kept_at": result.get("path")})
        card = result.get("card", {})
        version = self.registry.register(
            stable.name, result["path"], base_fingerprint=card.get("base_model_fingerprint", self.base_fingerprint),
            parent_version=stable.version, data_hash=card.get("data", {}).get("data_hash"),
            tuning_config={"data_path": plan["data_path"], "tune": cfg.model_dump(mode="json"),
                           "refresh_id": ref.id, "run_id": result.get("run_id")},
            gate_report=gate, state=VersionState.candidate, actor="refresh")
        self.metrics.refreshes.labels(ref.alias, "done").inc()
        return self.registry.update_refresh(ref.id, state="done", candidate=version.key,
                                            detail={"train": result.get("train", {}), "gate": gate})


class NotEnoughData(Exception):
    """Not enough labelled new traffic to retrain on."""

    def __init__(self, message: str, *, counts: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.counts = counts or {}


class _incumbent:
    """The stable version's files in a temporary directory under ``root`` (the gate's incumbent), removed
    afterwards. ``root`` is the refresh work directory: on a cluster a shared volume, so the tuning task on
    another node reads the same files (and writes its candidate where the controller registers it from)."""

    def __init__(self, registry: Registry, name: str, version: int, root: Path) -> None:
        self.registry, self.name, self.version, self.root = registry, name, version, root

    def __enter__(self) -> Path:
        import tempfile

        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="incumbent-", dir=self.root)
        return self.registry.fetch(self.name, self.version, Path(self._tmp.name) / "adapter")

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def _ray_runner(cfg: TuneConfig, data_path: str, name: str, *, timeout_s: float | None = None,
                **kw: Any) -> dict[str, Any]:
    """The tuning job as a Ray task, cancelled past ``timeout_s`` (``refresh.timeout_s``)."""
    import ray
    from ray.exceptions import GetTimeoutError

    from tsugiki.tuning.job import submit

    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)
    task = submit(cfg, data_path, name, **kw)
    try:
        return dict(ray.get(task, timeout=timeout_s))
    except GetTimeoutError:
        ray.cancel(task, force=True)
        raise TimeoutError(f"the tuning job ran past refresh.timeout_s ({timeout_s:.0f} s) and was cancelled: check "
                           f"that the cluster can schedule it (num_cpus {cfg.num_cpus}, num_gpus {cfg.num_gpus}) or "
                           "raise the limit") from None
