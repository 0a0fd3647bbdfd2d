"""Reading llama.cpp GGUF files as a Hugging Face config dict, HF-named float32 weights and a tokenizer.

GGUF tensors are renamed to transformers' names and dequantized; llama's q/k rows are un-permuted
back from llama.cpp's rotary layout, so the weights equal what
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` produces::

    token_embd.weight          -> model.embed_tokens.weight
    blk.{i}.attn_norm.weight   -> model.layers.{i}.input_layernorm.weight
    blk.{i}.attn_{q,k,v}.*     -> model.layers.{i}.self_attn.{q,k,v}_proj.*   (q, k un-permuted: llama)
    blk.{i}.attn_output.weight -> model.layers.{i}.self_attn.o_proj.weight
    blk.{i}.ffn_norm.weight    -> model.layers.{i}.post_attention_layernorm.weight
    blk.{i}.ffn_{gate,up,down} -> model.layers.{i}.mlp.{gate,up,down}_proj.weight
    output_norm.weight         -> model.norm.weight
    output.weight              -> lm_head.weight   (absent: tied to the embedding)

Any malformed file becomes a `ValueError` naming the path.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
_HEADER_BYTES = 24  # magic, u32 version, u64 tensor count, u64 metadata count
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, >=1 dim, type, offset
_MIN_KV_BYTES = 8 + 4  # key length, value type
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True, slots=True)
class _Arch:
    hf_class: str
    model_type: str
    attention_bias: bool
    rotary_permuted: bool  # llama.cpp permutes q/k rows for llama, not for qwen2


_ARCHS: dict[str, _Arch] = {
    "llama": _Arch("LlamaForCausalLM", "llama", attention_bias=False, rotary_permuted=True),
    "qwen2": _Arch("Qwen2ForCausalLM", "qwen2", attention_bias=True, rotary_permuted=False),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class _Cursor:
    """Bounds-checked reads over the file: every overrun becomes a ValueError naming the path."""

    def __init__(self, buf: memoryview, order: str, path: str) -> None:
        self.buf, self.order, self.path, self.pos = buf, order, path, 0

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise ValueError(
                f"{self.path} is truncated or corrupt: {what} at byte {start} needs {n} bytes, "
                f"the file has {len(self.buf)}"
            )
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(self.order + fmt), what)
        return struct.unpack_from(self.order + fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        start = self.take(n, what)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path} is corrupt: {what} at byte {start} is not UTF-8") from e


def _skip_value(cur: _Cursor, vtype: int, what: str, depth: int = 0) -> Any:
    """Walk one metadata value; returns it only for scalars (strings and arrays are just skipped)."""
    if vtype in _SCALAR_FORMATS:
        return cur.unpack(_SCALAR_FORMATS[vtype], what)
    if vtype == _STRING:
        cur.take(cur.unpack("Q", what), what)
        return None
    if vtype == _ARRAY and depth < 2:
        etype, count = cur.unpack("I", what), cur.unpack("Q", what)
        if etype in _SCALAR_FORMATS:
            cur.take(count * struct.calcsize("<" + _SCALAR_FORMATS[etype]), what)
            return None
        if count * 8 > len(cur.buf) - cur.pos:
            cur.take(count * 8, what)  # raises: each element needs at least 8 bytes, and the loop stays bounded
        for _ in range(count):
            _skip_value(cur, etype, what, depth + 1)
        return None
    raise ValueError(f"{cur.path} is corrupt: {what} has unknown value type {vtype}")


def _validate_gguf(path: str) -> None:
    """Check the whole layout (header, metadata, tensor table, tensor extents) before GGUFReader sees it:
    GGUFReader loops without end on absurd counts and fails on truncation with unrelated numpy errors."""
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES:
            raise ValueError(f"{path} is not a GGUF file: {len(head)} bytes is shorter than the GGUF header")
        if head[:4] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file: magic bytes are {head[:4]!r}, expected {GGUF_MAGIC!r}")
        for order in "<>":  # GGUFReader also reads big-endian files
            version, n_tensors, n_kv = struct.unpack(order + "IQQ", head[4:])
            if version in (2, 3):
                break
        else:
            raise ValueError(f"{path}: unsupported or corrupt GGUF version field {head[4:8]!r}")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                size = len(buf)
                if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > size:
                    raise ValueError(
                        f"{path} is corrupt or truncated: its header declares {n_tensors} tensors and {n_kv} "
                        f"metadata entries, which cannot fit in {size} bytes"
                    )
                cur = _Cursor(buf, order, path)
                cur.take(_HEADER_BYTES, "header")
                alignment = GGUF_DEFAULT_ALIGNMENT
                for i in range(n_kv):
                    key = cur.string(f"metadata key #{i}")
                    value = _skip_value(cur, cur.unpack("I", f"type of {key}"), f"metadata value {key}")
                    if key == "general.alignment" and isinstance(value, int) and value > 0:
                        alignment = value
                tensors = []
                for i in range(n_tensors):
                    name = cur.string(f"tensor name #{i}")
                    n_dims = cur.unpack("I", f"dimension count of {name}")
                    if not 1 <= n_dims <= 8:
                        raise ValueError(f"{path} is corrupt: tensor {name} has {n_dims} dimensions")
                    dims = [cur.unpack("Q", f"dimensions of {name}") for _ in range(n_dims)]
                    ggml_type, offset = cur.unpack("I", f"type of {name}"), cur.unpack("Q", f"offset of {name}")
                    tensors.append((name, dims, ggml_type, offset))
                data_start = -(-cur.pos // alignment) * alignment
            finally:
                buf.release()
    for name, dims, ggml_type, offset in tensors:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ValueError(f"{path}: tensor {name} has unknown ggml type {ggml_type}") from None
        elements = int(np.prod(dims, dtype=object))
        if elements % block:
            raise ValueError(f"{path} is corrupt: tensor {name} has {elements} elements, not whole blocks of {block}")
        end = data_start + offset + elements // block * block_bytes
        if end > size:
            raise ValueError(f"{path} is truncated: tensor {name} needs bytes up to {end}, the file has {size}")


def _open_reader(path: str) -> Any:
    """A GGUFReader over a validated file, or a ValueError naming the problem."""
    _validate_gguf(path)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # GGUFReader raises anything from struct/numpy on a corrupt file
        raise ValueError(f"{path} is a corrupt GGUF file: {type(e).__name__}: {e}") from e
    return reader


_MISSING = object()


def _field(reader: Any, key: str, path: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    try:
        return field.contents()
    except Exception as e:
        raise ValueError(f"{path}: GGUF metadata key {key!r} is unreadable: {e}") from e


def _rope_scaling(reader: Any, arch: str, path: str) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type", path, None)
    factor = _field(reader, f"{arch}.rope.scaling.factor", path, None)
    if kind is None and (legacy := _field(reader, f"{arch}.rope.scale_linear", path, None)) is not None:
        kind, factor = "linear", legacy
    if kind in (None, "none"):
        if any(t.name == "rope_freqs.weight" for t in reader.tensors):
            # Llama 3.1-style per-frequency factors: HF needs the llama3 parameters, which the file lacks.
            raise ValueError(f"{path}: llama3-style rope frequency factors (rope_freqs.weight) are not supported yet")
        return None
    if factor is None:
        raise ValueError(f"{path}: rope scaling type {kind!r} without {arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        optional = {
            "original_context_length": ("original_max_position_embeddings", int),
            "attn_factor": ("attention_factor", float),
            "yarn_beta_fast": ("beta_fast", float),
            "yarn_beta_slow": ("beta_slow", float),
        }
        for gguf_key, (hf_key, cast) in optional.items():
            value = _field(reader, f"{arch}.rope.scaling.{gguf_key}", path, None)
            if value is not None:
                scaling[hf_key] = cast(value)
        return scaling
    raise ValueError(f"{path}: rope scaling type {kind!r} is not supported")


def _config_from_reader(reader: Any, path: str) -> dict[str, Any]:
    arch = _field(reader, "general.architecture", path)
    if arch not in _ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {sorted(_ARCHS)})")
    spec = _ARCHS[arch]

    def key(name: str, default: Any = _MISSING) -> Any:
        return _field(reader, f"{arch}.{name}", path, default)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    key_length = key("attention.key_length", None)
    head_dim = int(key_length) if key_length is not None else hidden // heads

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    tensor_names = {t.name for t in reader.tensors}
    if tokens is not None:
        vocab_size = len(tokens.data)
    else:
        embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embed is None:
            raise ValueError(f"{path}: no tokenizer.ggml.tokens and no token_embd.weight to size the vocabulary")
        vocab_size = int(embed.shape[-1])  # ggml dims run fastest-first: [hidden, vocab]

    def token_id(name: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{name}", path, None)
        return None if value is None else int(value)

    eos = token_id("eos_token_id")
    # llama.cpp stops on every end-of-generation token: eos, end-of-turn, end-of-message.
    eos_ids = [i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]

    return {
        "architectures": [spec.hf_class],
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, arch, path),
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": eos,
        "eos_token_ids": list(dict.fromkeys(eos_ids)),
        "pad_token_id": token_id("padding_token_id"),
        # the weights are quantized; the engine picks the compute dtype
        "torch_dtype": "bfloat16",
        "attention_bias": spec.attention_bias,
        "mlp_bias": False,
    }


def load_gguf_config(path: str) -> dict[str, Any]:
    """An HF-style config dict (LlamaConfig / Qwen2Config keys) from a GGUF file's metadata."""
    return _config_from_reader(_open_reader(path), path)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's `permute` (convert_hf_to_gguf.py) that interleaves each head's rotary halves."""
    head_half = w.shape[0] // n_head // 2
    # [n_head, head_half, 2, *rest] -> [n_head, 2, head_half, *rest]
    return w.reshape(n_head, head_half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, dequantized float32 tensor in HF [out, in] layout) for every tensor."""
    from gguf.quants import dequantize

    reader = _open_reader(path)
    config = _config_from_reader(reader, path)
    permuted = _ARCHS[config["model_type"]].rotary_permuted
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise ValueError(f"{path}: GGUF tensor {t.name!r} has no Hugging Face {config['model_type']} counterpart")
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"{path}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): {e}") from e
        if permuted and ".self_attn.q_proj." in name:
            w = _unpermute_rotary(w, heads)
        elif permuted and ".self_attn.k_proj." in name:
            w = _unpermute_rotary(w, kv_heads)
        # copy: the reader's arrays are read-only views of the memory-mapped file
        yield name, torch.from_numpy(np.array(w, dtype=np.float32, copy=True))


def load_gguf_tokenizer(path: str) -> Any:
    """The GGUF's tokenizer as a Hugging Face fast tokenizer, with its chat template and bos/eos set."""
    _validate_gguf(path)
    from transformers import AutoTokenizer

    directory, filename = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    except Exception as e:  # transformers raises many types on a bad file; callers get one
        raise ValueError(f"{path}: cannot build a tokenizer from this GGUF file: {type(e).__name__}: {e}") from e

    needs_template = not getattr(tokenizer, "chat_template", None)
    if needs_template or tokenizer.eos_token_id is None or tokenizer.bos_token_id is None:
        # Older transformers drop some of these; read them from the metadata ourselves.
        reader = _open_reader(path)
        if needs_template:
            tokenizer.chat_template = _field(reader, "tokenizer.chat_template", path, None)
        for attr in ("bos", "eos"):
            token_id = _field(reader, f"tokenizer.ggml.{attr}_token_id", path, None)
            if getattr(tokenizer, f"{attr}_token_id") is None and token_id is not None:
                setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    return tokenizer
