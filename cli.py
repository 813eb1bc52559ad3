"""The ``tsugiki`` command.

    tsugiki serve [--host H] [--port P] [--base-model DIR] [--adapter-dir DIR] [--config FILE]
    tsugiki adapters list|load NAME PATH|unload NAME [--url URL] [--key KEY]
    tsugiki convert            convert and cache the embedded default model
    tsugiki tune --data FILE --name NAME [--val FILE] [--config FILE] [--screen] [--local] ...
    tsugiki demo [--quick] [--restart-controller]    the whole loop on the embedded default (see demo.py)
    tsugiki rollout status|start|promote|pause|resume|rollback ALIAS [--candidate name@vN]
    tsugiki registry versions [NAME] | register NAME PATH [--data FILE] | refresh ALIAS
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tsugiki.errors import ConfigError, TsugikiError


def _configure_logging(level: str) -> None:
    """Structured (one JSON object per line) and quiet by default."""

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname,
                                   "logger": record.name, "msg": record.getMessage()}
            for k in ("request_id", "base_model", "threads", "adapter"):
                if hasattr(record, k):
                    out[k] = getattr(record, k)
            if record.exc_info:
                out["exc"] = self.formatException(record.exc_info)
            return json.dumps(out)

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("tsugiki")
    root.handlers[:] = [handler]
    root.setLevel(level)


def cmd_serve(args: argparse.Namespace) -> int:
    from tsugiki.config import load_settings

    overrides: dict[str, Any] = {"server": {}, "model": {}, "adapters": {}}
    if args.host:
        overrides["server"]["host"] = args.host
    if args.port:
        overrides["server"]["port"] = args.port
    if args.base_model:
        overrides["model"]["base_model"] = args.base_model
    if args.adapter_dir:
        overrides["adapters"]["store_dir"] = args.adapter_dir
    settings = load_settings(args.config, **{k: v for k, v in overrides.items() if v})
    _configure_logging(settings.server.log_level)

    import ray
    from ray import serve

    from tsugiki.serve.deployments import build_application, init_ray, start_serve

    app = build_application(settings)  # converts the default model here, with a progress bar, the first time
    if not ray.is_initialized():
        init_ray(address=os.environ.get("RAY_ADDRESS"), log_to_driver=settings.server.log_level == "DEBUG",
                 logging_level=settings.server.log_level, include_dashboard=False)
    start_serve({"host": settings.server.host, "port": settings.server.port})
    print(f"tsugiki: starting on http://{settings.server.host}:{settings.server.port} ...", file=sys.stderr)
    serve.run(app, name="tsugiki", route_prefix="/")
    print(f"tsugiki: serving on http://{settings.server.host}:{settings.server.port}  (Ctrl-C stops)", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0


def _request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import httpx

    headers = {"authorization": f"Bearer {args.key}"} if args.key else {}
    try:
        r = httpx.request(method, args.url.rstrip("/") + path, json=body, headers=headers, timeout=120)
    except httpx.HTTPError as e:
        raise ConfigError(f"cannot reach the gateway at {args.url} ({e}); is `tsugiki serve` running? "
                          "pass --url or set TSUGIKI_URL") from e
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text
        raise TsugikiError(f"{r.status_code}: {msg}")
    return r.json()


def cmd_adapters(args: argparse.Namespace) -> int:
    if args.action == "list":
        data = _request(args, "GET", "/v1/adapters")["data"]
        for a in data:
            print(f"{a['name']}\tv{a['version']}\t{a['digest'][:12]}\t{a['source']}")
        if not data:
            print("no adapters loaded", file=sys.stderr)
    elif args.action == "load":
        if not args.path:
            raise ConfigError("usage: tsugiki adapters load NAME PATH")
        a = _request(args, "POST", "/v1/adapters", {"name": args.name, "path": os.path.abspath(args.path)})
        print(f"loaded {a['name']} v{a['version']} ({a['digest'][:12]})")
    else:
        a = _request(args, "DELETE", f"/v1/adapters/{args.name}")
        print(f"unloaded {a['name']} v{a['version']}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tsugiki.config import ModelConfig
    from tsugiki.serve.base_model import convert_default_model

    print(convert_default_model(ModelConfig().cache_dir, progress=True))
    return 0


def _tune_config(args: argparse.Namespace) -> Any:
    import yaml

    from tsugiki.tuning.config import TuneConfig

    raw: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read {args.config}: {e}") from e
        raw = raw.get("tune", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{args.config}: expected a mapping of TuneConfig fields (optionally under 'tune:')")
        raw = dict(raw)
    flags = {"method": args.method, "num_layers": args.num_layers, "rank": args.rank, "alpha": args.alpha,
             "learning_rate": args.lr, "epochs": args.epochs, "batch_size": args.batch_size,
             "num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "seed": args.seed}
    raw.update({k: v for k, v in flags.items() if v is not None})
    if args.layers:
        try:
            raw["layers"] = (tuple(int(x) for x in args.layers.split(",")) if args.layers[0].isdigit()
                             else args.layers)
        except ValueError:
            raise ConfigError(f"--layers {args.layers!r}: use upper, probe, all or comma-separated layer "
                              f"indices such as 26,27,28,29") from None
    if args.base_model:
        raw["model"] = {**raw.get("model", {}), "base_model": args.base_model}
    if args.no_robust:
        raw["robust"] = None
    try:
        return TuneConfig(**raw)
    except Exception as e:  # pydantic's message names the field
        raise ConfigError(f"invalid tuning settings: {e}") from e


def cmd_tune(args: argparse.Namespace) -> int:
    from tsugiki.tuning import job
    from tsugiki.tuning.data import DataError

    _configure_logging(args.log_level)
    cfg = _tune_config(args)
    kw: dict[str, Any] = {"val_path": args.val, "store_dir": args.store_dir, "work_dir": args.work_dir}
    try:
        if args.local:
            result = job.run_local(cfg, args.data, args.name, **kw)
        else:
            result = job.tune(cfg, args.data, args.name, screen=args.screen, **kw)
    except (DataError, ValueError, OSError) as e:
        print(f"tsugiki: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a failure inside the Ray task: show its cause, not the remote traceback
        from ray.exceptions import RayTaskError

        if not isinstance(e, RayTaskError):
            raise
        cause = getattr(e, "cause", None) or e
        print(f"tsugiki: error: the tuning task failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 2
    g = result.gate
    print(json.dumps(result.to_dict(), indent=1, default=str) if args.json else
          f"{result.status}: {result.adapter or result.path}\n"
          f"  clean accuracy {g['clean_accuracy']:.3f}; per family "
          + ", ".join(f"{k} {v:.3f}" for k, v in g["family_accuracy"].items())
          + f"\n  negative flips {g['negative_flip_rate']}; retained agreement {g['retained_agreement']}"
          + f"; strength {g['strength']}\n  {result.train['steps']} steps in {result.train['seconds']} s"
          + ("" if g["passed"] else "\n  gate failures: " + "; ".join(g["failures"])))
    return 0 if result.status == "written" else 3


def cmd_demo(args: argparse.Namespace) -> int:
    from tsugiki import demo

    _configure_logging(args.log_level)
    try:
        summary = demo.run(args)
    except demo.DemoFailed as e:
        from tsugiki.config import default_home

        home = Path(args.home or default_home() / "demo").expanduser()
        print(f"tsugiki demo: failed: {e}\n  what it measured so far: {home / 'summary.json'}", file=sys.stderr)
        return 1
    demo.print_summary(summary)
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.action == "status":
        out = _request(args, "GET", f"/v1/rollouts/{args.alias}")
    elif args.action == "start":
        if not args.candidate:
            raise ConfigError("usage: tsugiki rollout start ALIAS --candidate NAME@vN")
        out = _request(args, "POST", f"/v1/rollouts/{args.alias}", {"candidate": args.candidate})
    else:
        out = _request(args, "POST", f"/v1/rollouts/{args.alias}/{args.action}", {})
    print(json.dumps(out, indent=1))
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    if args.action == "versions":
        out = _request(args, "GET", "/v1/registry/versions" + (f"?name={args.name}" if args.name else ""))
        for v in out["data"]:
            print(f"{v['key']}\t{v['state']}\t{v['digest'][:12]}\tparent v{v['parent_version']}")
        return 0
    if not args.name:
        extra = " PATH" if args.action == "register" else ""
        raise ConfigError(f"usage: tsugiki registry {args.action} NAME{extra}")
    if args.action == "register":
        if not args.path:
            raise ConfigError("usage: tsugiki registry register NAME PATH [--data FILE]")
        body = {"name": args.name, "path": os.path.abspath(args.path),
                "data_path": os.path.abspath(args.data) if args.data else None}
        out = _request(args, "POST", "/v1/registry/versions", body)
    else:
        out = _request(args, "POST", f"/v1/refresh/{args.name}", {"reason": "requested from the CLI"})
    print(json.dumps(out, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsugiki", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the base model and adapters over an OpenAI-compatible API (Ray Serve)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--base-model", help="local transformers model directory (default: embedded SmolLM2-135M)")
    s.add_argument("--adapter-dir", help="adapter store directory (default: ~/.cache/tsugiki/adapters)")
    s.add_argument("--config", help="YAML or JSON settings file (sections: model, adapters, engine, server)")
    s.set_defaults(func=cmd_serve)
    a = sub.add_parser("adapters", help="list, load or unload adapters on a running gateway")
    a.add_argument("action", choices=["list", "load", "unload"])
    a.add_argument("name", nargs="?")
    a.add_argument("path", nargs="?")
    a.add_argument("--url", default=os.environ.get("TSUGIKI_URL", "http://127.0.0.1:8000"))
    a.add_argument("--key", default=os.environ.get("TSUGIKI_ADMIN_KEY"))
    a.set_defaults(func=cmd_adapters)
    c = sub.add_parser("convert", help="convert and cache the embedded default model")
    c.set_defaults(func=cmd_convert)
    t = sub.add_parser("tune", help="tune a robust LoRA adapter on a Ray worker, gate it, write it to the store",
                       description="Exit status: 0 written to the store, 3 rejected by the gate, 2 bad input.")
    t.add_argument("--data", required=True, help="JSON Lines: prompt/completion, text/label or messages records")
    t.add_argument("--name", required=True, help="adapter name in the store")
    t.add_argument("--val", help="validation JSON Lines (default: a content-hash split of --data)")
    t.add_argument("--config", help="YAML/JSON TuneConfig (top level or under 'tune:'); flags override it")
    t.add_argument("--base-model", help="local transformers model directory (default: embedded SmolLM2-135M)")
    t.add_argument("--store-dir", help="adapter store (default: ~/.cache/tsugiki/adapters)")
    t.add_argument("--work-dir", help="checkpoints and reports (default: ~/.cache/tsugiki/tuning)")
    t.add_argument("--method", choices=["lora"])
    t.add_argument("--layers", help="upper | probe | all | comma-separated layer indices")
    t.add_argument("--num-layers", type=int)
    t.add_argument("--rank", type=int)
    t.add_argument("--alpha", type=float)
    t.add_argument("--lr", type=float)
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--num-cpus", type=float, help="CPUs the Ray task declares (also torch's threads)")
    t.add_argument("--num-gpus", type=float)
    t.add_argument("--no-robust", action="store_true", help="no noise augmentation or consistency term")
    t.add_argument("--screen", action="store_true", help="ASHA screen over rank, learning rate and layers first")
    t.add_argument("--local", action="store_true", help="run in this process instead of a Ray task")
    t.add_argument("--json", action="store_true", help="print the whole result as JSON")
    t.add_argument("--log-level", default="WARNING")
    t.set_defaults(func=cmd_tune)
    d = sub.add_parser("demo", help="the whole loop on the embedded default: serve, drift, refresh, canary, promote",
                       description="Serves an alias, shifts its traffic to new CLINC150 domains, detects the drift, "
                                   "tunes and gates a robust candidate, canaries and promotes it, then shows a "
                                   "corrupted candidate rolled back automatically. Needs port --port free.")
    d.add_argument("--quick", action="store_true", help="shorter tuning (for tests)")
    d.add_argument("--restart-controller", action="store_true",
                   help="kill the controller replica mid-rollout and check that the rollout continues")
    d.add_argument("--skip-bad-candidate", action="store_true")
    d.add_argument("--home", help="demo directory (default: ~/.cache/tsugiki/demo; its registry is reset)")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--log-level", default="WARNING")
    d.set_defaults(func=cmd_demo)
    for name, fn, actions in (("rollout", cmd_rollout, ["status", "start", "promote", "pause", "resume", "rollback"]),
                              ("registry", cmd_registry, ["versions", "register", "refresh"])):
        r = sub.add_parser(name, help=f"{name} operations on a running gateway")
        r.add_argument("action", choices=actions)
        r.add_argument("alias" if name == "rollout" else "name", nargs=None if name == "rollout" else "?")
        if name == "rollout":
            r.add_argument("--candidate", help="version key to roll out (start)")
        else:
            r.add_argument("path", nargs="?")
            r.add_argument("--data", help="the adapter's training data (JSON Lines), used by refreshes")
        r.add_argument("--url", default=os.environ.get("TSUGIKI_URL", "http://127.0.0.1:8000"))
        r.add_argument("--key", default=os.environ.get("TSUGIKI_ADMIN_KEY"))
        r.set_defaults(func=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "action", None) in ("load", "unload") and not args.name:
        print(f"tsugiki: error: `tsugiki adapters {args.action}` needs an adapter NAME", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except TsugikiError as e:
        print(f"tsugiki: error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
