"""kv_cache_dtype="fp8" end to end (CPU, fp32 model): the caches are e4m3 and the same budget buys 2x
the blocks of a 16-bit cache (4x of fp32); greedy tokens stay close to the model-dtype cache and to
transformers; the decode-graph plumbing holds the fp8 caches; bad values fail with a clear error."""

from __future__ import annotations

import pytest
import torch

from distrt import LLM, SamplingParams
from distrt.config_file import apply_config_file
from distrt.cli import build_parser, engine_kwargs
from distrt.messages import SamplingSpec
from distrt.worker.request_state import RequestState
from tiny_models import load_hf_model, make_tiny_checkpoint

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("fp8kv")), "llama-gqa", seed=5)


def _llm(path: str, kv_cache_dtype: str, **kw: object) -> LLM:
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("dtype", "float32")
    kw.setdefault("max_model_len", 128)
    return LLM(path, device="cpu", block_size=4, kv_cache_dtype=kv_cache_dtype, **kw)  # type: ignore[arg-type]


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 9, 17, 26, 33, 40, 5, 21, 12, 30, 7, 15)]


def _runner(llm: LLM):  # type: ignore[no-untyped-def]
    return llm._executor.worker.runner  # type: ignore[attr-defined]


def _teacher_forced_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits at every position of `ids` in one prefill (attention reads each key back from the cache)."""
    runner = _runner(llm)
    st = RequestState("tf", ids, len(ids), list(range(-(-len(ids) // 4))), 0, SamplingSpec(seed=0))  # type: ignore[arg-type]
    inputs = runner.prepare([st], [len(ids)])
    inputs.sample_token_idx = torch.arange(len(ids))
    return runner.forward_logits(inputs)


@pytest.mark.parametrize("dtype,elem_bytes", [("bfloat16", 2), ("float16", 2), ("float32", 4)])
def test_fp8_cache_gets_more_blocks(ckpt: str, dtype: str, elem_bytes: int) -> None:
    """Same kv_cache_memory (1 MiB of the CPU budget; num_kv_blocks not forced): fp8 gets elem_bytes x the blocks."""
    elems_per_block = 2 * 2 * 4 * 2 * 16  # layers x (K, V) x block_size x kv heads x head_dim (llama-gqa)
    blocks = {}
    for kv in ("auto", "fp8", "fp8_e4m3"):
        llm = _llm(ckpt, kv, dtype=dtype, num_kv_blocks=None, kv_cache_memory=float(2**20))
        k_cache, v_cache = _runner(llm).kv_caches[0]
        want = getattr(torch, dtype) if kv == "auto" else torch.float8_e4m3fn
        assert k_cache.dtype == v_cache.dtype == want
        blocks[kv] = llm.engine.allocator.num_blocks
        assert k_cache.shape[0] == blocks[kv]
        llm.shutdown()
    assert blocks["auto"] == 2**20 // (elems_per_block * elem_bytes), blocks
    assert blocks["fp8"] == blocks["fp8_e4m3"] == 2**20 // elems_per_block == elem_bytes * blocks["auto"], blocks


def test_fp8_greedy_close_to_auto_and_transformers(ckpt: str) -> None:
    auto, fp8 = _llm(ckpt, "auto"), _llm(ckpt, "fp8")
    prompts = _prompts(auto.config.model.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    want = auto.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    got = fp8.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    first_same = sum(g.outputs[0].token_ids[0] == w.outputs[0].token_ids[0] for g, w in zip(got, want))
    assert first_same >= 0.75 * len(prompts), f"first tokens agree for {first_same}/{len(prompts)} prompts"
    assert all(len(g.outputs[0].token_ids) == NEW_TOKENS for g in got)
    fp8.engine.check_integrity()
    assert fp8.engine.allocator.num_free_blocks == fp8.engine.allocator.num_blocks

    # Teacher forcing on prompt + the auto engine's continuation: top-1 of fp8 vs transformers and vs auto.
    hf = load_hf_model(ckpt)
    agree_hf = agree_auto = total = 0
    errs = []
    for p, w in zip(prompts, want):
        ids = p + list(w.outputs[0].token_ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        ours, base = _teacher_forced_logits(fp8, ids), _teacher_forced_logits(auto, ids)
        agree_hf += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        agree_auto += int((ours.argmax(-1) == base.argmax(-1)).sum())
        assert torch.equal(base.argmax(-1), ref.argmax(-1))  # the auto cache is exact (fp32): the metric's yardstick
        total += len(ids)
        errs.append(((ours - ref).norm() / ref.norm()).item())
    assert agree_hf / total >= 0.9 and agree_auto / total >= 0.9, (agree_hf, agree_auto, total)
    # e4m3 K/V move the logits (so the fp8 path really ran) but only by a few percent
    assert 1e-3 < max(errs) < 0.1, errs


def test_fp8_decode_graph_plumbing(ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode-graph path (static buffers holding the fp8 caches; replays run eagerly on CPU) gives
    the eager fp8 tokens."""
    prompts = _prompts(211)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ref = _llm(ckpt, "fp8").generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    monkeypatch.setenv("DISTRT_EAGER_GRAPHS", "1")
    llm = _llm(ckpt, "fp8", max_num_seqs=8)
    graphs = _runner(llm).graphs
    assert graphs is not None and graphs.kv_caches[0][0].dtype == torch.float8_e4m3fn
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in ref]


@pytest.mark.parametrize("kw", [dict(max_num_batched_tokens=8), dict(num_kv_blocks=30, max_model_len=64)],
                         ids=["chunked-prefill", "preemption"])
def test_fp8_chunking_and_preemption_keep_tokens(ckpt: str, kw: dict) -> None:
    """A prompt's keys are always read back from the fp8 cache, so prefill chunks (the cached prefix read
    by later chunks) and recompute after preemption give the tokens of one whole-prompt prefill."""
    prompts = _prompts(211)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ref = _llm(ckpt, "fp8").generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    llm = _llm(ckpt, "fp8", **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in ref]
    stats = llm.engine.scheduler.stats
    if "num_kv_blocks" in kw:
        assert stats.num_preemptions > 0
    else:  # 218 prompt tokens in chunks of <= 8 (one whole-prompt step would make it NEW_TOKENS + 1)
        assert stats.num_steps > NEW_TOKENS + 218 // 8
    llm.engine.check_integrity()
    assert llm.engine.allocator.num_free_blocks == llm.engine.allocator.num_blocks


def test_bad_kv_cache_dtype(ckpt: str) -> None:
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of auto, fp8, fp8_e4m3, got 'int4'"):
        _llm(ckpt, "int4")


def test_cli_flag() -> None:
    def parse(*argv: str):  # type: ignore[no-untyped-def]
        return engine_kwargs(apply_config_file(build_parser().parse_args(["generate", "--prompt", "x", *argv])))

    assert parse()["kv_cache_dtype"] == "auto"
    assert parse("--kv-cache-dtype", "fp8")["kv_cache_dtype"] == "fp8"
    assert parse("--kv-cache-dtype", "fp8_e4m3")["kv_cache_dtype"] == "fp8_e4m3"
    with pytest.raises(SystemExit):
        parse("--kv-cache-dtype", "int4")
