"""Tensor parallelism under gloo: tp=2 and tp=4 logits equal tp=1 (fp32, 1e-5), vocab padded."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import pytest
import torch

from proc_utils import run_gloo_ranks
from tiny_models import make_tiny_checkpoint

HERE = os.path.dirname(__file__)


def _rank_main(rank: int, world: int, init: str, path: str, q: "mp.Queue") -> None:
    sys.path[:0] = [HERE, os.path.dirname(HERE)]
    from distrt.parallel.comm_torch_dist import TorchDistComm
    from tp_shard_checks import shard_logits

    comm = TorchDistComm.create(rank, world, init)
    try:
        logits = shard_logits(path, rank, world, comm)
        q.put((rank, [t.tolist() for t in logits]))
    finally:
        comm.destroy()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    # 4 query heads / 2 KV heads: tp=4 replicates KV heads; vocab 211 is not divisible by 2 or 4.
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tpg")), "llama-gqa")


@pytest.mark.parametrize("world", [2, 4])
def test_tp_logits_match_tp1_under_gloo(ckpt: str, world: int) -> None:
    from tp_shard_checks import shard_logits

    ref = shard_logits(ckpt, 0, 1, None)
    results = run_gloo_ranks(_rank_main, world, (ckpt,), timeout=120)
    for rank in range(world):
        for got, want in zip(results[rank], ref):
            got_t = torch.tensor(got)
            assert got_t.shape == want.shape
            torch.testing.assert_close(got_t, want, rtol=1e-5, atol=1e-5)
