"""`distrt serve` and `distrt bench serve`; registered in distrt/cli.py's SUBCOMMANDS.

`--config FILE` is a YAML mapping with the same keys as the flags (`max-num-seqs` or `max_num_seqs`);
flags given on the command line win over it, and it wins over the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

_UNSET: Any = type("_Unset", (), {"__repr__": lambda self: "<unset>"})()
_NOT_CONFIGURABLE = ("help", "config", "func")


def add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from distrt.cli import _add_engine_args
    from distrt.server.settings import DEFAULT_MAX_REQUEST_BYTES

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--config", default=None, help="YAML file with the same keys as these flags (flags win)")
    _add_engine_args(p)
    e = p.add_argument_group("engine (more)")
    e.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks (overrides --kv-cache-memory)")
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--enforce-eager", action="store_true")
    e.add_argument("--step-timeout", type=float, default=300.0,
                   help="seconds a step may take before the engine is declared dead (watchdog)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("DISTRT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DISTRT_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="model id in the API (default: basename of --model)")
    s.add_argument("--max-concurrent-requests", type=int, default=1024, help="more get 429")
    s.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="larger bodies get 413")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests before stopping")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--enable-debug-routes", action="store_true", help=argparse.SUPPRESS)
    _defer_defaults(p)
    p.set_defaults(func=run_serve)


def add_bench_serve_subcommand(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from distrt.bench.serve import add_arguments, run_from_args

    p = bench_sub.add_parser("serve", help="load-test an OpenAI-compatible server (Poisson arrivals, streaming)")
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def _defer_defaults(p: argparse.ArgumentParser) -> None:
    """Defaults become _UNSET so that resolve_config can tell flags given from flags defaulted."""
    defaults = {}
    for action in p._actions:
        if action.dest in _NOT_CONFIGURABLE:
            continue
        defaults[action.dest] = action.default
        action.default = _UNSET
    p.set_defaults(_defaults=defaults, _options={opt.lstrip("-").replace("-", "_"): a.dest for a in p._actions
                                                 for opt in a.option_strings if a.dest not in _NOT_CONFIGURABLE})


def resolve_config(a: argparse.Namespace) -> argparse.Namespace:
    """Fills what the command line left unset: from --config, else the flag's default."""
    file_values: dict[str, Any] = {}
    if a.config:
        import yaml

        with open(a.config) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{a.config}: expected a mapping of flag names to values")
        for key, value in raw.items():
            dest = a._options.get(str(key).replace("-", "_"))
            if dest is None:
                raise ValueError(f"{a.config}: unknown key {key!r} (use the flag names of `distrt serve`)")
            file_values[dest] = value
    out = argparse.Namespace(**{k: v for k, v in vars(a).items() if not k.startswith("_")})
    for dest, default in a._defaults.items():
        if getattr(out, dest) is _UNSET:
            setattr(out, dest, file_values.get(dest, default))
    return out


def served_model_name(model: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    if model == "default":
        from distrt.models.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    base = os.path.basename(os.path.normpath(model))
    return base[:-5] if base.endswith(".gguf") else base


def run_serve(raw: argparse.Namespace) -> int:
    from distrt.cli import engine_kwargs
    from distrt.engine.async_engine import AsyncLLMEngine
    from distrt.llm import LLM
    from distrt.server.serve import run_server
    from distrt.server.settings import ServerSettings

    a = resolve_config(raw)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(served_model_name=served_model_name(a.model, a.served_model_name), host=a.host,
                              port=a.port, api_key=a.api_key or None,
                              max_concurrent_requests=a.max_concurrent_requests,
                              max_request_bytes=a.max_request_bytes, drain_timeout=a.drain_timeout,
                              enable_debug_routes=a.enable_debug_routes, log_level=a.log_level)
    llm = LLM(a.model, num_kv_blocks=a.num_kv_blocks, max_num_batched_tokens=a.max_num_batched_tokens,
              enforce_eager=a.enforce_eager, step_timeout_s=a.step_timeout, **engine_kwargs(a))
    return run_server(AsyncLLMEngine.from_llm(llm), settings)
