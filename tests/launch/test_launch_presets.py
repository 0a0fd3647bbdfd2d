"""Parallel-layout presets (cluster_configs/presets/*.yaml) through `--config`: every preset loads
for generate, serve and bench; flags typed on the command line win over the file (also when equal
to their default); unknown keys and bad values are errors that name the key; the Ray cluster YAMLs
pass Ray's own schema; and a preset run end to end (tp=3 over MPI, one key overridden) prints the
same text as a local tp=1 run."""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import io
import os
import sys

import pytest
import yaml

from distrt.cli import build_parser, main
from distrt.config_file import apply_config_file
from launch_helpers import REPO, launch_env, lines, local_generate, run

PRESETS = sorted(glob.glob(os.path.join(REPO, "cluster_configs", "presets", "*.yaml")))
ENGINE_KEYS = {"model", "tp", "pp", "ep", "executor", "dtype", "device", "max_model_len", "max_num_seqs",
               "block_size", "kv_cache_memory", "seed"}


def _generate(argv: list[str]) -> argparse.Namespace:
    return apply_config_file(build_parser().parse_args(["generate", *argv]))


def _serve(argv: list[str]) -> argparse.Namespace:
    from distrt.server.cli_serve import resolve_config

    return resolve_config(build_parser().parse_args(["serve", *argv]))


def _subcommands(*path: str) -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(sub.choices) if sub else {}


def _write(tmp_path: object, text: str) -> str:
    path = os.path.join(str(tmp_path), "preset.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_presets_exist() -> None:
    names = {os.path.basename(p) for p in PRESETS}
    assert {"llama-8b-tp2.yaml", "smollm2-cpu-tp3-mpi.yaml"} <= names, names


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_loads_everywhere(path: str) -> None:
    with open(path) as f:
        raw = yaml.safe_load(f)
    assert ENGINE_KEYS <= set(raw), f"{path} lacks {ENGINE_KEYS - set(raw)}"
    a = _generate(["--config", path, "--prompt", "x"])
    for key in ENGINE_KEYS:
        assert getattr(a, key) == raw[key], key
    assert isinstance(a.tp, int) and isinstance(a.kv_cache_memory, float) and a.executor in ("ray", "mpi", "local")
    s = _serve(["--config", path])
    for key in ENGINE_KEYS | ({"host", "port"} & set(raw)):
        assert getattr(s, key) == raw[key], key
    for command in [c for c in ("throughput", "latency") if c in _subcommands("bench")]:
        b = apply_config_file(build_parser().parse_args(["bench", command, "--config", path]))
        assert (b.model, b.tp, b.executor) == (raw["model"], raw["tp"], raw["executor"])


def test_named_preset_lookup() -> None:
    a = _generate(["--config", "llama-8b-tp2", "--prompt", "x"])
    assert a.tp == 2 and a.executor == "ray"


def test_flags_given_win_over_file(tmp_path: object) -> None:
    path = _write(tmp_path, "tp: 4\nseed: 5\nmax-model-len: 64\nexecutor: mpi\nkv_cache_memory: 4e9\nport: 9\n")
    a = _generate(["--config", path, "--tp", "2", "--prompt", "x"])
    assert (a.tp, a.seed, a.max_model_len, a.executor, a.kv_cache_memory) == (2, 5, 64, "mpi", 4e9)
    b = _generate(["--seed", "0", "--config", path, "--prompt", "x"])  # equal to the default, still typed: wins
    assert b.seed == 0 and b.tp == 4
    c = _generate(["--prompt", "x"])  # no file: the parser's defaults
    assert (c.tp, c.seed, c.max_model_len, c.executor, c.kv_cache_memory) == (1, 0, None, "auto", 0.9)
    assert not hasattr(c, "_config_spec") and c.max_tokens == 128


@pytest.mark.parametrize("text, message", [
    ("prot: 1\n", "unknown key 'prot'"),
    ("tp: two\n", "'tp': 'two' is not a valid int"),
    ("tp: 2.5\n", "'tp': 2.5 is not a valid int"),
    ("ignore_eos: 3\n", "'ignore_eos' must be true or false"),
    ("- tp\n", "expected a mapping"),
], ids=["unknown-key", "not-an-int", "float-for-int", "not-a-bool", "not-a-mapping"])
def test_bad_file_is_a_clear_error(tmp_path: object, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["generate", "--config", path, "--prompt", "x"])
    assert rc == 2 and message in err.getvalue(), err.getvalue()


def test_missing_preset_lists_the_known_ones() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["generate", "--config", "no-such-preset", "--prompt", "x"])
    assert rc == 2 and "llama-8b-tp2" in err.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", ["ray-onprem.yaml", "ray-aws-gpu.yaml"])
def test_ray_cluster_yaml_passes_ray_schema(name: str) -> None:
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(REPO, "cluster_configs", name)) as f:
        config = yaml.safe_load(f)
    validate_config(prepare_config(copy.deepcopy(config)))
    assert any("pip install" in c and "distrt" in c for c in config["setup_commands"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_preset_end_to_end_matches_local(tmp_path_factory: pytest.TempPathFactory) -> None:
    """smollm2-cpu-tp3-mpi.yaml with --model overridden by a tiny checkpoint (3 heads: tp=3 divides
    them; SmolLM2 itself is too slow to load three times here): tp, executor, device, dtype,
    max_model_len and the KV budget all come from the file."""
    from tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("preset-ckpt")), "llama-mha", intermediate_size=96,
                                max_position_embeddings=2048)
    prompt = ["--prompt", "w5 w6 w7", "--max-tokens", "12", "--ignore-eos"]
    want = local_generate(["--model", ckpt, "--device", "cpu", "--dtype", "float32", "--max-model-len", "2048",
                           "--kv-cache-memory", "4000000", *prompt])
    preset = os.path.join(REPO, "cluster_configs", "presets", "smollm2-cpu-tp3-mpi.yaml")
    proc = run([os.path.join(os.path.dirname(sys.executable), "distrt"), "generate", "--config", preset,
                "--model", ckpt, *prompt], timeout=240, env=launch_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert want in lines(proc.stdout), f"want {want!r}\n{proc.stdout}\n{proc.stderr[-3000:]}"
