"""Stage-to-stage send/recv under gloo, at the worker level: 3 stages of a 5-layer model split
(2, 1, 2), two plans in flight, give the same greedy tokens and log-probabilities as one worker."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys

import pytest

from proc_utils import run_gloo_ranks
from tiny_models import make_tiny_checkpoint

HERE = os.path.dirname(__file__)
STEPS = 8


def _rank_main(rank: int, world: int, init: str, path: str, split: tuple[int, ...], q: "mp.Queue") -> None:
    sys.path[:0] = [HERE, os.path.dirname(HERE)]
    from distrt.parallel.comm_torch_dist import TorchDistComm
    from pp_checks import worker_decode

    comm = TorchDistComm.create(rank, world, init)
    try:
        out = worker_decode(path, rank, world, comm, split, STEPS,
                            share=lambda obj: comm.broadcast_object(obj, src=world - 1))
        q.put((rank, out))
    finally:
        comm.destroy()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ppg")), "llama-gqa", num_hidden_layers=5)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "stage-graphs"])
def test_pp3_uneven_stages_match_one_worker_under_gloo(ckpt: str, graphs: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """stage-graphs: each stage's decode steps go through its DecodeGraphs' static buffers (replayed
    eagerly on CPU: DISTRT_EAGER_GRAPHS), the path CUDA graphs take on GPUs."""
    if graphs:
        monkeypatch.setenv("DISTRT_EAGER_GRAPHS", "1")
    from pp_checks import worker_decode

    want = worker_decode(ckpt, 0, 1, None, None, STEPS, share=lambda obj: obj)
    world, split = 3, (2, 1, 2)
    results = run_gloo_ranks(_rank_main, world, (ckpt, split), timeout=120)
    assert len(want) == STEPS and {rid for rid, _, _ in want} == {"a", "b"}
    for rank in range(world):  # every stage saw the same tokens (shared as the coordinator would)
        got = results[rank]
        assert [(r, t) for r, t, _ in got] == [(r, t) for r, t, _ in want]
        for (_, _, lp), (_, _, wlp) in zip(got, want):
            assert math.isclose(lp, wlp, abs_tol=1e-5)
