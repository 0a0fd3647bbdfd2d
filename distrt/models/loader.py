"""Reading Hugging Face checkpoint directories: config.json and safetensors weights.

A worker for tensor parallelism reads only its slice of each tensor, so the weights are exposed
lazily as well as eagerly::

    model_dir/
      config.json                      -> load_hf_config
      generation_config.json           (eos ids merged in)
      model.safetensors                -> iter_safetensors_weights / iter_safetensors_lazy
      or model.safetensors.index.json  {"weight_map": {name: shard file}}
         model-00001-of-0000N.safetensors ...

Every malformed input becomes a `ValueError` naming the file, never a raw safetensors error; a
missing directory or config.json is a `ModelFileNotFoundError`, both a `ValueError` and a
`FileNotFoundError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}


class ModelFileNotFoundError(FileNotFoundError, ValueError):
    """A missing model directory or file; both kinds so callers can catch either."""


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def load_hf_config(model_dir: str) -> dict[str, Any]:
    """config.json as a dict, with `eos_token_ids`: the union of config's and generation_config's eos ids."""
    if not os.path.isdir(model_dir):
        raise ModelFileNotFoundError(f"model directory {model_dir} does not exist or is not a directory")
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ModelFileNotFoundError(f"{config_path} not found: {model_dir} is not a Hugging Face model directory")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")

    eos_ids = _as_id_list(config.get("eos_token_id"))
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        gen = _read_json(gen_path)
        if isinstance(gen, dict):
            # generation_config.json is what `generate` stops on; Llama 3 lists <|eot_id|> only there.
            eos_ids += [i for i in _as_id_list(gen.get("eos_token_id")) if i not in eos_ids]
    config["eos_token_ids"] = list(dict.fromkeys(eos_ids))
    return config


class LazyTensor:
    """One tensor of an open safetensors file, read only when asked: all of it, or a slice along one dim."""

    __slots__ = ("name", "path", "_handle", "shape", "dtype")

    def __init__(self, name: str, path: str, handle: Any) -> None:
        self.name = name
        self.path = path
        self._handle = handle
        sl = handle.get_slice(name)
        self.shape: tuple[int, ...] = tuple(sl.get_shape())
        dtype_name = sl.get_dtype()
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        self.dtype: torch.dtype = _SAFETENSORS_DTYPES[dtype_name]

    def load(self) -> torch.Tensor:
        try:
            return self._handle.get_tensor(self.name)
        except SafetensorError as e:
            raise ValueError(f"{self.path}: cannot read tensor {self.name!r}: {e}") from e

    def load_slice(self, dim: int, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) along `dim`, reading only those bytes (a TP rank's shard)."""
        ndim = len(self.shape)
        if not -ndim <= dim < ndim:
            raise ValueError(f"{self.name}: dim {dim} out of range for shape {self.shape}")
        dim %= ndim
        if not 0 <= start <= end <= self.shape[dim]:
            raise ValueError(f"{self.name}: slice [{start}, {end}) out of range for dim {dim} of shape {self.shape}")
        index = (slice(None),) * dim + (slice(start, end),)
        try:
            return self._handle.get_slice(self.name)[index]
        except SafetensorError as e:
            raise ValueError(f"{self.path}: cannot read a slice of tensor {self.name!r}: {e}") from e

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, shape={self.shape}, dtype={self.dtype}, file={self.path!r})"


def _open_safetensors(path: str) -> Any:
    if not os.path.isfile(path):
        raise ValueError(f"safetensors file {path} is missing")
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{path} is corrupt or truncated (not a valid safetensors file): {e}") from e
    except OSError as e:
        raise ValueError(f"cannot open safetensors file {path}: {e}") from e


def _weight_files(model_dir: str) -> list[tuple[str, set[str] | None]]:
    """[(file, names the index places in it, or None for "all of them")], in a stable order."""
    if not os.path.isdir(model_dir):
        raise ModelFileNotFoundError(f"model directory {model_dir} does not exist or is not a directory")
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map' of tensor names to shard files")
        by_file: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            by_file.setdefault(shard, set()).add(name)
        return [(os.path.join(model_dir, shard), names) for shard, names in sorted(by_file.items())]
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [(single, None)]
    raise ValueError(f"no weights in {model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} is there")


def iter_safetensors_lazy(
    model_dir: str, names_filter: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, LazyTensor]]:
    """(name, LazyTensor) for every wanted tensor; shards holding no wanted name are never opened."""
    for path, indexed_names in _weight_files(model_dir):
        if indexed_names is not None and names_filter is not None:
            if not any(names_filter(n) for n in indexed_names):
                continue
        if indexed_names is not None and not os.path.isfile(path):
            raise ValueError(f"shard {path} named in {os.path.join(model_dir, INDEX_FILE)} is missing")
        handle = _open_safetensors(path)
        names = list(handle.keys())
        if indexed_names is not None:
            # a name the index puts in another shard is read from there, never twice
            present = set(names)
            names = [n for n in names if n in indexed_names]
            missing = indexed_names.difference(present)
            if missing:
                raise ValueError(
                    f"{path} lacks {len(missing)} tensor(s) that {INDEX_FILE} places in it, "
                    f"e.g. {sorted(missing)[:3]}"
                )
        for name in names:
            if names_filter is None or names_filter(name):
                yield name, LazyTensor(name, path, handle)


def iter_safetensors_weights(
    model_dir: str, names_filter: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every wanted tensor of a single-file or sharded safetensors checkpoint."""
    for name, lazy in iter_safetensors_lazy(model_dir, names_filter):
        yield name, lazy.load()
