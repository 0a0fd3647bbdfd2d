"""cuda_graph_sizes: which decode batch sizes get a CUDA graph. Validated up front, reachable from
LLM(...), the CLI and --config files, and (graph plumbing replayed eagerly on CPU) the same tokens as
transformers whichever sizes the batch pads up to."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from distrt import LLM, SamplingParams
from distrt.cli import build_parser, engine_kwargs
from distrt.config import check_graph_sizes
from distrt.config_file import apply_config_file
from distrt.worker.cuda_graph import DEFAULT_SIZES, capture_sizes
from tiny_models import hf_greedy, load_hf_model, make_tiny_checkpoint


def test_capture_sizes_default_and_custom() -> None:
    assert capture_sizes(260) == [s for s in DEFAULT_SIZES if s < 260] + [260]
    assert capture_sizes(512)[-3:] == [448, 480, 512]
    assert 288 in capture_sizes(512) and 264 not in capture_sizes(512)
    assert capture_sizes(300, (8, 264, 272, 1024)) == [8, 264, 272, 300]  # above max_num_seqs: never used
    assert capture_sizes(8, (8,)) == [8]


@pytest.mark.parametrize("bad,match", [
    ([], r"\(empty\)"), ([0, 4], r"bad: \[0\]"), ([4, -2], r"bad: \[-2\]"), ([2, 2.5], r"bad: \[2.5\]"),
    ([True], r"bad: \[True\]"), ("1,2", "must be a list of batch sizes"), (7, "must be a list of batch sizes"),
])
def test_bad_sizes_rejected(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_graph_sizes(bad)


def test_sizes_sorted_and_deduplicated() -> None:
    assert check_graph_sizes([16, 4, 16, 1]) == (1, 4, 16)


def _parse(*argv: str) -> dict:  # type: ignore[type-arg]
    return engine_kwargs(apply_config_file(build_parser().parse_args(["generate", "--prompt", "x", *argv])))


def test_cli_flag_and_config_file(tmp_path: Path) -> None:
    assert _parse()["cuda_graph_sizes"] is None
    assert _parse("--cuda-graph-sizes", "1,2,264,272")["cuda_graph_sizes"] == [1, 2, 264, 272]
    cfg = tmp_path / "graphs.yaml"
    cfg.write_text("cuda_graph_sizes: [8, 16, 264]\n")
    assert _parse("--config", str(cfg))["cuda_graph_sizes"] == [8, 16, 264]
    cfg.write_text("cuda-graph-sizes: 4,8\n")
    assert _parse("--config", str(cfg))["cuda_graph_sizes"] == [4, 8]
    with pytest.raises(SystemExit):
        _parse("--cuda-graph-sizes", "1,two")
    cfg.write_text("cuda_graph_sizes: [1, x]\n")
    with pytest.raises((ValueError, SystemExit)):
        _parse("--config", str(cfg))


def test_cli_type_error_names_the_value() -> None:
    p = argparse.ArgumentParser()
    from distrt.cli import _int_list

    p.add_argument("--s", type=_int_list)
    with pytest.raises(SystemExit):
        p.parse_args(["--s", "3,x"])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("graphs")), "llama-gqa", seed=5)


def test_bad_sizes_fail_before_loading(ckpt: str) -> None:
    with pytest.raises(ValueError, match="cuda_graph_sizes must be positive integers"):
        LLM(ckpt, dtype="float32", device="cpu", cuda_graph_sizes=[0])


def test_custom_sizes_same_tokens_as_transformers(ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 prompts pad up to the 6-row graph, then to 3 and 1 as they finish at different lengths."""
    monkeypatch.setenv("DISTRT_EAGER_GRAPHS", "1")
    prompts = [[3, 14, 15, 92], [65, 35], [89, 79, 32, 38, 46], [26], [43, 38, 32]]
    lens = [12, 3, 9, 6, 1]
    llm = LLM(ckpt, dtype="float32", device="cpu", max_num_seqs=8, num_kv_blocks=64, max_model_len=128,
              cuda_graph_sizes=[3, 1, 6])
    runner = llm._executor.worker.runner  # type: ignore[attr-defined]
    assert runner.graphs.sizes == [1, 3, 6, 8]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lens],
                        use_tqdm=False)
    hf = load_hf_model(ckpt)
    for p, n, o in zip(prompts, lens, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, n)
    llm.shutdown()
