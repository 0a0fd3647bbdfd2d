"""`serve` flags: --config YAML under command-line flags, and the served model name."""

from __future__ import annotations

import argparse
import os

import pytest

from distrt.server.cli_serve import add_serve_parser, resolve_config, served_model_name


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return resolve_config(parser.parse_args(["serve", *argv]))


def test_config_file_under_flags(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "serve.yaml")
    with open(path, "w") as f:
        f.write("port: 9001\nmax-num-seqs: 7\ntp: 2\napi_key: from-file\nenable-debug-routes: true\n")
    a = _parse(["--config", path, "--port", "9002"])
    assert a.port == 9002 and a.max_num_seqs == 7 and a.tp == 2 and a.api_key == "from-file"
    assert a.enable_debug_routes is True
    b = _parse(["--port", "8000", "--config", path])  # a flag equal to its default still wins
    assert b.port == 8000
    c = _parse([])
    assert c.port == 8000 and c.host == "127.0.0.1" and c.max_num_seqs == 256 and c.enable_debug_routes is False


def test_config_unknown_key(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "bad.yaml")
    with open(path, "w") as f:
        f.write("prot: 1\n")
    with pytest.raises(ValueError, match="unknown key 'prot'"):
        _parse(["--config", path])


def test_served_model_name() -> None:
    assert served_model_name("default", None) == "SmolLM2-135M-Instruct"
    assert served_model_name("/models/Llama-3-8B/", None) == "Llama-3-8B"
    assert served_model_name("/m/qwen.gguf", None) == "qwen"
    assert served_model_name("/m/x", "my-name") == "my-name"
