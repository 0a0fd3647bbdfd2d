"""Skinny GEMV (distrt/kernels/gemv.py) and its dispatch from distrt/layers/linear.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testutil import CPU_DTYPES, DEVICE, needs_gpu, needs_triton, rel_err, tol

from distrt.kernels import gemv
from distrt.kernels.activation import silu_and_mul_ref
from distrt.kernels.gemv import skinny_gate_up_silu_ref, skinny_linear_ref

# (M, N, K): N and K off the block sizes (masked tails), one and several K steps, M up to 16
SHAPES = [(1, 40, 300), (3, 64, 256), (5, 100, 520), (16, 48, 128)]
CONFIGS = {
    "fma": dict(mode="fma", BLOCK_N=8, BLOCK_K=128, num_warps=4, num_stages=2, split_k=1),
    "fma_split3": dict(mode="fma", BLOCK_N=4, BLOCK_K=64, num_warps=4, num_stages=2, split_k=3),
    "dot": dict(mode="dot", BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2, split_k=1),
    "dot_split2": dict(mode="dot", BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3, split_k=2),
}


def _inputs(m: int, n_rows: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n_rows, k, generator=g) / k ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(n_rows, generator=g).to(dtype).to(DEVICE) if bias else None
    return x, w, b


def test_refs_against_definition() -> None:
    x, w, b = _inputs(3, 20, 16, torch.float32, bias=True)
    torch.testing.assert_close(skinny_linear_ref(x, w, b), F.linear(x, w, b))
    torch.testing.assert_close(skinny_gate_up_silu_ref(x, w, b), silu_and_mul_ref(F.linear(x, w, b)))


def test_default_config_and_buckets() -> None:
    assert [gemv.m_bucket(m) for m in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    for kind in ("linear", "gate_up"):
        for m in (1, 2, 4, 8, 16):
            cfg = gemv.default_config(kind, m, 2048, 4096)
            assert set(cfg) == set(gemv.CONFIG_KEYS) and cfg["split_k"] >= 1
            if cfg["mode"] == "dot":
                assert cfg["BLOCK_N"] >= 16  # tl.dot's minimum
    assert gemv.default_config("linear", 1, 1 << 16, 4096)["split_k"] == 1  # enough programs already
    assert gemv.default_config("linear", 1, 512, 14336)["split_k"] > 1


def test_load_tuned_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemv, "_TUNED", {})
    cfg = dict(mode="dot", BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=4, split_k=2)
    doc = {"details": {"best_configs": [dict(kind="linear", m_bucket=4, N=96, K=64, config={**cfg, "x": 1})]}}
    assert gemv.load_tuned(doc) == 1
    assert gemv.get_config("linear", 3, 96, 64, torch.device("cpu")) == cfg
    assert gemv.get_config("linear", 5, 96, 64, torch.device("cpu")) != cfg  # other bucket: default


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_skinny_linear_matches_ref(dtype: torch.dtype, shape: tuple[int, int, int], cfg: str) -> None:
    m, n, k = shape
    x, w, b = _inputs(m, n, k, dtype, bias=shape[0] % 2 == 1)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    gemv.skinny_linear(x, w, b, config=CONFIGS[cfg], out=out)
    torch.testing.assert_close(out, skinny_linear_ref(x, w, b), **tol(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_skinny_gate_up_silu_matches_ref(dtype: torch.dtype, shape: tuple[int, int, int], cfg: str) -> None:
    m, inter, k = shape
    x, w, b = _inputs(m, 2 * inter, k, dtype, bias=shape[0] % 2 == 0)
    out = torch.full((m, inter), float("nan"), dtype=dtype, device=DEVICE)
    gemv.skinny_gate_up_silu(x, w, b, config=CONFIGS[cfg], out=out)
    torch.testing.assert_close(out, skinny_gate_up_silu_ref(x, w, b), **tol(dtype))


@needs_triton
@pytest.mark.parametrize("kind", ["linear", "gate_up"])
def test_default_config_strided_input_and_split_determinism(kind: str) -> None:
    m, n, k = 2, 64, 4096  # few programs: the default config splits K
    assert gemv.default_config(kind, m, n, k)["split_k"] > 1
    wide = torch.randn(m, k + 8, dtype=torch.float32, device=DEVICE)
    x = wide[:, :k]  # row stride k + 8
    _, w, _ = _inputs(m, 2 * n if kind == "gate_up" else n, k, torch.float32, bias=False)
    fn, ref = ((gemv.skinny_gate_up_silu, skinny_gate_up_silu_ref) if kind == "gate_up"
               else (gemv.skinny_linear, skinny_linear_ref))
    first, second = fn(x, w), fn(x, w)
    torch.testing.assert_close(first, ref(x, w), **tol(torch.float32))
    assert torch.equal(first, second)  # fixed-order split reduction


@needs_triton
def test_zero_rows_and_too_many_rows() -> None:
    _, w, _ = _inputs(1, 16, 32, torch.float32, bias=False)
    assert gemv.skinny_linear(torch.empty(0, 32, device=DEVICE), w).shape == (0, 16)
    with pytest.raises(AssertionError):
        gemv.skinny_linear(torch.randn(17, 32, device=DEVICE), w)


# ---------------------------------------------------------------------------------- dispatch (linear.py)

def _layers(dtype: torch.dtype):
    from distrt.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear

    torch.manual_seed(0)
    col = ColumnParallelLinear(64, 48, bias=True, tp_rank=0, tp_size=1, dtype=dtype)
    row = RowParallelLinear(40, 64, bias=False, tp_rank=0, tp_size=1, dtype=dtype)
    merged = MergedColumnParallelLinear(64, [40, 40], bias=False, tp_rank=0, tp_size=1, dtype=dtype)
    for layer in (col, row, merged):
        layer.to(DEVICE)
        for p in layer.parameters():
            p.data.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return col, row, merged


class _Spy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in ("skinny_linear", "skinny_gate_up_silu"):
            real = getattr(gemv, name)
            monkeypatch.setattr(gemv, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def fn(*a, **kw):
            self.calls.append(name)
            return real(*a, **kw)
        return fn


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_dispatch_forced_on(monkeypatch: pytest.MonkeyPatch, force_triton: None, dtype: torch.dtype) -> None:
    if DEVICE == "cuda" and dtype == torch.float32:
        pytest.skip("fp32 is routed to the skinny GEMV only on the CPU (interpreter tests)")
    monkeypatch.setenv("DISTRT_SKINNY_GEMV", "1")
    spy = _Spy(monkeypatch)
    col, row, merged = _layers(dtype)
    x = torch.randn(3, 64).to(dtype).to(DEVICE)
    torch.testing.assert_close(col(x), skinny_linear_ref(x, col.weight, col.bias), **tol(dtype))
    h = torch.randn(1, 2, 40).to(dtype).to(DEVICE)  # leading dims are flattened and restored
    assert row(h).shape == (1, 2, 64)
    torch.testing.assert_close(row(h)[0], skinny_linear_ref(h[0], row.weight), **tol(dtype))
    act = merged.forward_silu(x)
    assert act.shape == (3, 40)
    torch.testing.assert_close(act, skinny_gate_up_silu_ref(x, merged.weight), **tol(dtype))
    assert spy.calls.count("skinny_gate_up_silu") == 1 and spy.calls.count("skinny_linear") == 3


@needs_triton
def test_dispatch_off_on_cpu_by_default_and_limits(monkeypatch: pytest.MonkeyPatch, force_triton: None) -> None:
    from distrt.layers import linear as linear_mod

    spy = _Spy(monkeypatch)
    col, _, merged = _layers(torch.float32)
    x = torch.randn(2, 64, device=DEVICE)
    monkeypatch.delenv("DISTRT_SKINNY_GEMV", raising=False)
    assert linear_mod.SKINNY_DEFAULT and not linear_mod.skinny_enabled(x)  # default: CUDA tensors only
    torch.testing.assert_close(col(x), F.linear(x, col.weight, col.bias))
    torch.testing.assert_close(merged.forward_silu(x), silu_and_mul_ref(F.linear(x, merged.weight)))
    monkeypatch.setenv("DISTRT_SKINNY_GEMV", "0")
    col(x)
    monkeypatch.setenv("DISTRT_SKINNY_GEMV", "1")
    big = torch.randn(linear_mod.SKINNY_MAX_M + 1, 64, device=DEVICE)
    torch.testing.assert_close(col(big), F.linear(big, col.weight, col.bias))  # too many rows: cuBLAS path
    monkeypatch.setenv("DISTRT_FORCE_TRITON", "0")
    col(x)  # CPU tensors without DISTRT_FORCE_TRITON: never routed
    assert spy.calls == []


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("shape", [(4096, 2048), (3072, 4096), (4096, 7168)], ids=str)
def test_gpu_bf16_vs_ref(m: int, shape: tuple[int, int]) -> None:
    n, k = shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    assert rel_err(gemv.skinny_linear(x, w, b), skinny_linear_ref(x, w, b)) < 1e-2
    assert rel_err(gemv.skinny_gate_up_silu(x, w), skinny_gate_up_silu_ref(x, w)) < 1e-2


@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_capture_with_split() -> None:
    x = torch.randn(4, 14336, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) / 120
    cfg = dict(mode="fma", BLOCK_N=4, BLOCK_K=512, num_warps=4, num_stages=2, split_k=4)
    eager = gemv.skinny_linear(x, w, config=cfg)
    gemv.skinny_gate_up_silu(x, w)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv.skinny_linear(x, w, config=cfg)
        act = gemv.skinny_gate_up_silu(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, skinny_linear_ref(x, w)) < 1e-2 and not torch.equal(out, eager)
    assert rel_err(act, skinny_gate_up_silu_ref(x, w)) < 1e-2


@pytest.mark.gpu
@needs_gpu
def test_gpu_layers_take_skinny_path_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without DISTRT_SKINNY_GEMV a bf16 decode-sized input on CUDA goes to the skinny GEMV (and its
    fused gate_up + SiLU), and the layers' outputs match the fp32 references."""
    from distrt.layers import linear as linear_mod

    monkeypatch.delenv("DISTRT_SKINNY_GEMV", raising=False)
    spy = _Spy(monkeypatch)
    col = linear_mod.ColumnParallelLinear(4096, 3072, bias=False, tp_rank=0, tp_size=1, dtype=torch.bfloat16).cuda()
    merged = linear_mod.MergedColumnParallelLinear(4096, [2048, 2048], bias=False, tp_rank=0, tp_size=1,
                                                   dtype=torch.bfloat16).cuda()
    for layer in (col, merged):
        torch.nn.init.normal_(layer.weight, std=4096 ** -0.5)
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    assert rel_err(col(x), skinny_linear_ref(x, col.weight)) < 1e-2
    assert rel_err(merged.forward_silu(x), skinny_gate_up_silu_ref(x, merged.weight)) < 1e-2
    assert len(spy.calls) == 2
