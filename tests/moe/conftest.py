"""Session fixtures for tests/moe: the tiny MoE checkpoints, written once (transformers is slow to start)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # moe_testutil, moe_checks

from moe_testutil import MOE_ARCHS, make_moe_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def moe_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("moe"))
    return {name: make_moe_checkpoint(root, name, seed=i) for i, name in enumerate(MOE_ARCHS)}


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Tiny shapes gain nothing from intra-op threads, and on a busy CI box some CPU ops (index_add_,
    which transformers' MoE uses) crawl when their thread pool has to wait for a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
