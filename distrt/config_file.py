"""`--config FILE`: parallel-layout presets (YAML) for the engine subcommands of the CLI.

A preset is a flat YAML mapping whose keys are flag names, spelled either way
(`max_model_len` or `max-model-len`), e.g. cluster_configs/presets/llama-8b-tp2.yaml:

    model: /models/Meta-Llama-3.1-8B-Instruct
    tp: 2
    executor: ray
    dtype: bfloat16
    host: 0.0.0.0        # a `serve` key: other subcommands skip it

Precedence: a flag given on the command line > the file > the flag's default. Only flags the user
actually typed override the file: the parser's defaults are replaced by argparse.SUPPRESS, so an
unset flag is absent from the namespace until `apply_config_file` fills it in. A key that is a flag
of another distrt subcommand (host/port for `generate`) is skipped; any other key is an error that
names it. `--config NAME` without a path looks for cluster_configs/presets/NAME.yaml (or
$DISTRT_PRESETS_DIR/NAME.yaml).

`distrt serve` keeps its own loader (distrt/server/cli_serve.py, same file format);
`install_config_option` adds --config to every other subcommand that takes the engine flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

_NOT_CONFIGURABLE = frozenset({"help", "config", "func"})
PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster_configs", "presets")


@dataclasses.dataclass(frozen=True)
class ConfigSpec:
    """What one subcommand accepts from a file: option name -> action, and each dest's real default."""

    command: str
    actions: dict[str, argparse.Action]  # normalised option name ("max_model_len") -> action
    defaults: dict[str, Any]  # dest -> the default argparse would have used
    elsewhere: frozenset[str]  # option names of the other subcommands (skipped, not errors)


def _norm(key: str) -> str:
    return str(key).lstrip("-").replace("-", "_")


def _leaf_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(prefix.strip(), parser)]
    out: list[tuple[str, argparse.ArgumentParser]] = []
    seen: set[int] = set()
    for action in subs:
        for name, child in action.choices.items():
            if id(child) not in seen:  # aliases map to the same parser
                seen.add(id(child))
                out.extend(_leaf_parsers(child, f"{prefix} {name}"))
    return out


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {_norm(opt): a for a in parser._actions if a.dest not in _NOT_CONFIGURABLE
            for opt in a.option_strings if opt.startswith("--")}


def _takes_engine_flags(parser: argparse.ArgumentParser) -> bool:
    return any(a.dest == "tp" for a in parser._actions)


def install_config_option(root: argparse.ArgumentParser) -> None:
    """Adds `--config FILE` to each subcommand with the engine flags that has no --config of its own."""
    leaves = _leaf_parsers(root)
    names = {id(p): set(_options(p)) for _, p in leaves}
    for command, parser in leaves:
        if not _takes_engine_flags(parser) or any(a.dest == "config" for a in parser._actions):
            continue
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="YAML preset with the same keys as these flags (flags given here win), "
                                 "e.g. cluster_configs/presets/llama-8b-tp2.yaml")
        defaults = {}
        for action in parser._actions:
            if action.dest in _NOT_CONFIGURABLE or action.default is argparse.SUPPRESS:
                continue
            defaults[action.dest] = action.default
            action.default = argparse.SUPPRESS
        others = set().union(*(n for i, n in names.items() if i != id(parser)))
        spec = ConfigSpec(command, _options(parser), defaults, frozenset(others - names[id(parser)]))
        parser.set_defaults(_config_spec=spec)


def find_preset(path: str) -> str:
    """A file path as given, else a preset name looked up in $DISTRT_PRESETS_DIR and cluster_configs/presets."""
    if os.path.exists(path):
        return path
    if os.sep not in path and not path.endswith((".yaml", ".yml")):
        dirs = [d for d in (os.environ.get("DISTRT_PRESETS_DIR"), PRESETS_DIR) if d]
        for d in dirs:
            candidate = os.path.join(d, path + ".yaml")
            if os.path.exists(candidate):
                return candidate
        known = sorted({f[:-5] for d in dirs if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".yaml")})
        raise ValueError(f"--config {path}: no such file, and no preset of that name (known: {', '.join(known) or 'none'})")
    raise ValueError(f"--config {path}: no such file")


def load_config_file(path: str, spec: ConfigSpec) -> dict[str, Any]:
    """dest -> value for the keys of `path` that this subcommand takes; raises ValueError naming a bad key."""
    import yaml

    path = find_preset(path)
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = _norm(key)
        action = spec.actions.get(name)
        if action is None:
            if name in spec.elsewhere:
                continue  # e.g. `port` in a preset shared with `distrt serve`
            raise ValueError(f"{path}: unknown key {key!r} (not a flag of `distrt {spec.command}`)")
        values[action.dest] = _coerce(path, key, action, value)
    return values


def _coerce(path: str, key: Any, action: argparse.Action, value: Any) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{path}: {key!r} must be true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_convert(path, key, action, v) for v in items]
    return _convert(path, key, action, value)


def _convert(path: str, key: Any, action: argparse.Action, value: Any) -> Any:
    if value is None:
        return None
    if action.type is not None and callable(action.type):
        if isinstance(value, bool):
            raise ValueError(f"{path}: {key!r} must be a {getattr(action.type, '__name__', 'value')}, got {value!r}")
        try:  # through str: YAML reads 4e9 as a string, and int("2.5") must fail, not truncate
            value = action.type(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {key!r}: {value!r} is not a valid "
                             f"{getattr(action.type, '__name__', 'value')}") from e
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{path}: {key!r} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def apply_config_file(args: argparse.Namespace) -> argparse.Namespace:
    """Fills every flag the command line left out: from --config, else its default. A no-op for
    namespaces of subcommands without the option."""
    spec: ConfigSpec | None = getattr(args, "_config_spec", None)
    if spec is None:
        return args
    file_values = load_config_file(args.config, spec) if getattr(args, "config", None) else {}
    out = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "_config_spec"})
    for dest, default in spec.defaults.items():
        if not hasattr(out, dest):
            setattr(out, dest, file_values.get(dest, default))
    return out
