"""The fused MoE kernel (Triton; interpreter on CPU) and its torch reference."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from distrt.kernels.fused_moe import fused_moe_op, fused_moe_ref, moe_align_block_size

HAS_TRITON = importlib.util.find_spec("triton") is not None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _problem(tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype,
             seed: int = 0, foreign: bool = False, device: str = DEVICE):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5
    scores = torch.randn(tokens, experts + (2 if foreign else 0), generator=g)
    weights, ids = torch.softmax(scores, -1).topk(top_k, dim=-1)  # ids >= experts: another rank's
    if foreign and tokens:
        ids[0, 0] = -1
    return (x.to(dtype).to(device), w13.to(dtype).to(device), w2.to(dtype).to(device),
            weights.to(device), ids.to(device))


def _by_definition(x, w13, w2, weights, ids):  # type: ignore[no-untyped-def]
    """Token by token, choice by choice, straight from the formula (float64)."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < w13.shape[0]:
                continue
            h = w13[e].double() @ x[t].double()
            out[t] += float(weights[t, j]) * (w2[e].double() @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    return out


def test_ref_matches_definition() -> None:
    x, w13, w2, w, ids = _problem(9, 24, 20, 5, 2, torch.float32, foreign=True, device="cpu")
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, w, ids).double(), _by_definition(x, w13, w2, w, ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens,top_k,experts", [(1, 2, 8), (7, 1, 4), (13, 3, 5), (40, 2, 8)])
def test_align_groups_every_pair_once(tokens: int, top_k: int, experts: int) -> None:
    block = 16
    ids = torch.randint(-1, experts + 2, (tokens, top_k), generator=torch.Generator().manual_seed(tokens))
    sorted_ids, block_expert, num_padded = moe_align_block_size(ids, experts, block)
    n = tokens * top_k
    assert sorted_ids.shape[0] == block_expert.shape[0] * block
    assert sorted_ids.shape[0] >= n + experts * (block - 1)
    flat = ids.reshape(-1)
    mine = [p for p in range(n) if 0 <= int(flat[p]) < experts]
    real = [int(p) for p in sorted_ids if p < n]
    assert sorted(real) == mine  # every pair of ours exactly once; others' pairs dropped
    for b, e in enumerate(block_expert.tolist()):
        rows = [int(p) for p in sorted_ids[b * block:(b + 1) * block]]
        if e < 0:
            assert all(p == n for p in rows) and b * block >= int(num_padded)
        else:
            assert all(p == n or int(flat[p]) == e for p in rows) and any(p < n for p in rows)
    experts_in_order = [e for e in block_expert.tolist() if e >= 0]
    assert experts_in_order == sorted(experts_in_order)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k", [
    (1, 32, 16, 4, 2),      # decode, one block per expert hit
    (13, 48, 40, 5, 3),     # K and N not multiples of the tiles
    (37, 64, 24, 8, 2),     # several blocks per expert
])
def test_triton_matches_ref(dtype: torch.dtype, tokens: int, hidden: int, inter: int, experts: int,
                            top_k: int) -> None:
    from distrt.kernels.fused_moe import fused_moe

    x, w13, w2, w, ids = _problem(tokens, hidden, inter, experts, top_k, dtype, foreign=True)
    torch.testing.assert_close(fused_moe(x, w13, w2, w, ids), fused_moe_ref(x, w13, w2, w, ids), **TOL[dtype])


@needs_triton
def test_triton_handles_no_tokens_and_strided_input() -> None:
    from distrt.kernels.fused_moe import fused_moe

    x, w13, w2, w, ids = _problem(0, 32, 16, 4, 2, torch.float32)
    assert fused_moe(x, w13, w2, w, ids).shape == (0, 32)
    x, w13, w2, w, ids = _problem(6, 32, 16, 4, 2, torch.float32)
    wide = torch.zeros(6, 40, device=DEVICE)
    wide[:, :32] = x
    torch.testing.assert_close(fused_moe(wide[:, :32], w13, w2, w, ids), fused_moe_ref(x, w13, w2, w, ids),
                               **TOL[torch.float32])


def test_wrapper_rejects_bad_inputs() -> None:
    x, w13, w2, w, ids = _problem(3, 32, 16, 4, 2, torch.float32, device="cpu")
    with pytest.raises(AssertionError):
        fused_moe_ref(x, w13, w2, w.half(), ids)  # weights must be fp32
    with pytest.raises(AssertionError):
        fused_moe_ref(x, w13, w2[:, :, :8], w, ids)  # w2 does not match w13
    with pytest.raises(AssertionError):
        fused_moe_ref(x[:2], w13, w2, w, ids)  # token counts differ


@needs_triton
def test_op_dispatches_to_triton_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    import distrt.kernels.fused_moe as fm

    x, w13, w2, w, ids = _problem(5, 32, 16, 4, 2, torch.float32)
    calls: list[int] = []
    real = fm.fused_moe
    monkeypatch.setattr(fm, "fused_moe", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("DISTRT_FORCE_TRITON", "1")
    torch.testing.assert_close(fused_moe_op(x, w13, w2, w, ids), fused_moe_ref(x, w13, w2, w, ids), **TOL[torch.float32])
    assert calls == [1]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens", [1, 16, 512, 4096])
def test_gpu_bf16_mixtral_shapes(tokens: int) -> None:
    """Mixtral-8x7B at tp=8 (experts sliced 8 ways): H 4096, I 14336/8, 8 experts, top-2."""
    from distrt.kernels.fused_moe import fused_moe

    x, w13, w2, w, ids = _problem(tokens, 4096, 1792, 8, 2, torch.bfloat16, device="cuda")
    out = fused_moe(x, w13, w2, w, ids)
    ref = fused_moe_ref(x, w13, w2, w, ids)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, rel


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16_many_experts_with_foreign_ids() -> None:
    """Qwen3-30B-A3B-like: 128 experts top-8, half of them on another EP rank (ids outside [0, 64))."""
    from distrt.kernels.fused_moe import fused_moe

    x, w13, w2, w, ids = _problem(333, 2048, 768, 128, 8, torch.bfloat16, device="cuda")
    w13, w2 = w13[:64].contiguous(), w2[:64].contiguous()
    out = fused_moe(x, w13, w2, w, ids)
    ref = fused_moe_ref(x, w13, w2, w, ids)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, rel
