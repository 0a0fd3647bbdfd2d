"""Session fixtures for the loader tests: the embedded SmolLM2 GGUF and transformers' own reading of it."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Plain `pytest` (unlike `python -m pytest`) puts only the test folder on sys.path while distrt is
# not pip-installed.
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    from distrt.models.default_model import default_model_path

    try:
        return default_model_path()
    except ValueError as e:
        pytest.skip(f"embedded SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="session")
def hf_gguf_model(smollm2_gguf_path: str) -> Any:
    """transformers' float32 model from the same GGUF: the reference for names, layouts and config."""
    import torch
    from transformers import AutoModelForCausalLM

    directory, filename = os.path.split(smollm2_gguf_path)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(smollm2_gguf_path: str) -> Any:
    from transformers import AutoTokenizer

    directory, filename = os.path.split(smollm2_gguf_path)
    return AutoTokenizer.from_pretrained(directory, gguf_file=filename)


@pytest.fixture(scope="session")
def gguf_tokenizer(smollm2_gguf_path: str) -> Any:
    from distrt.models.gguf_loader import load_gguf_tokenizer

    return load_gguf_tokenizer(smollm2_gguf_path)
