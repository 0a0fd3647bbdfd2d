"""Frozen configuration, split by concern, resolved ("auto" -> value) before freezing."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("float32", "float16", "bfloat16")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # "fp8" is e4m3 (vLLM's and TensorRT-LLM's FP8 KV cache)


@dataclass(frozen=True)
class ModelConfig:
    path: str
    kind: str  # "hf" (checkpoint directory) or "gguf" (single file)
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    dtype: str  # compute dtype, resolved
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    hf_config: dict[str, Any] = field(compare=False, repr=False, default_factory=dict)

    @staticmethod
    def from_hf_dict(cfg: dict[str, Any], *, path: str, kind: str, dtype: str) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError(f"{path}: config has no 'architectures' entry; cannot pick a model class")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        eos = cfg.get("eos_token_ids")
        if eos is None:
            eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        return ModelConfig(
            path=path,
            kind=kind,
            architecture=archs[0],
            model_type=cfg.get("model_type", ""),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            dtype=dtype,
            eos_token_ids=tuple(int(e) for e in eos_ids),
            bos_token_id=cfg.get("bos_token_id"),
            hf_config=dict(cfg),
        )

    def check_tensor_parallel(self, tp: int) -> None:
        """The splits the TP layers need, checked on the coordinator before any worker starts."""
        if self.num_heads % tp:
            raise ValueError(f"num_attention_heads ({self.num_heads}) is not divisible by tensor_parallel_size ({tp})")
        kv = self.num_kv_heads
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise ValueError(f"num_key_value_heads ({kv}) and tensor_parallel_size ({tp}) must divide one another")
        if self.intermediate_size % tp:
            raise ValueError(f"intermediate_size ({self.intermediate_size}) is not divisible by tensor_parallel_size ({tp})")

    @property
    def checkpoint_dtype(self) -> str | None:
        d = self.hf_config.get("torch_dtype") or self.hf_config.get("dtype")
        return d if d in _DTYPES else None


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    rs = cfg.get("rope_scaling")
    if rs is None:
        params = cfg.get("rope_parameters")  # transformers >= 5 spelling
        if params and params.get("rope_type", "default") != "default":
            rs = params
    if not rs:
        return None
    rs = dict(rs)
    rs.setdefault("rope_type", rs.get("type", "default"))
    return None if rs["rope_type"] == "default" else rs


def check_graph_sizes(sizes: object) -> tuple[int, ...]:
    """A user's cuda_graph_sizes: a non-empty list of positive integers (sorted and de-duplicated here)."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise ValueError(f"cuda_graph_sizes must be a list of batch sizes, got {sizes!r}")
    items = list(sizes)
    bad = [s for s in items if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if not items or bad:
        raise ValueError(f"cuda_graph_sizes must be positive integers, got {items!r}"
                         + (f" (bad: {bad!r})" if bad else " (empty)"))
    return tuple(sorted(set(items)))


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # <= 1.0: fraction of the device memory left after weights and a profiling forward;
    # > 1: bytes. On CPU the fraction applies to a fixed budget (cpu_kv_budget_bytes).
    kv_cache_memory: float = 0.9
    num_kv_blocks: int | None = None  # explicit override (tests force preemption with it)
    cpu_kv_budget_bytes: int = 2 << 30
    # "auto": the model's compute dtype; "fp8"/"fp8_e4m3": float8 e4m3, half the bytes of bf16 per
    # block (twice the blocks, half the KV bytes decode reads), with per-tensor scales of 1.0
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if not self.kv_cache_memory > 0:
            raise ValueError(f"kv_cache_memory must be a fraction in (0, 1] or a byte count, got {self.kv_cache_memory}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    executor: str = "local"
    step_timeout_s: float = 300.0  # the step watchdog: a step (or hung collective) past this kills the engine
    init_timeout_s: float = 900.0
    # layers per pipeline stage, e.g. (3, 5) for 8 layers on 2 stages; None: as even as possible
    pp_layer_split: tuple[int, ...] | None = None
    num_redundant_experts: int = 0  # extra MoE expert slots for replicas of hot experts
    expert_rebalance_interval: int = 0  # steps between load reports / rebalances (0: off)
    # small TP all-reduces through the one-shot CUDA IPC kernel when the group's GPUs allow it
    custom_all_reduce: bool = True
    # pp > 1: micro-batches (plans) in flight; None: pp. pp + 1 keeps the first stage fed while the
    # last stage's tokens travel back, but each plan is smaller: on 2 H200s (8B shape, 512 x 128/128)
    # pp + 1 gave 1.47x one GPU and pp 1.54x in the same run (benchmarks/results/h200x2/tp.json)
    pipeline_micro_batches: int | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        mb = self.pipeline_micro_batches
        if mb is not None and (not isinstance(mb, int) or isinstance(mb, bool) or mb < 1):
            raise ValueError(f"pipeline_micro_batches must be an integer >= 1 (or None: pp), got {mb!r}")
        split = self.pp_layer_split
        if split is not None:
            if (not isinstance(split, tuple) or len(split) != self.pipeline_parallel_size
                    or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in split)):
                raise ValueError(f"pp_layer_split must be a tuple of {self.pipeline_parallel_size} layer counts "
                                 f">= 1 (one per pipeline stage), got {split!r}")

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layers per pipeline stage for a model of num_layers (checked: each >= 1, summing to it)."""
        pp = self.pipeline_parallel_size
        if self.pp_layer_split is not None:
            if sum(self.pp_layer_split) != num_layers:
                raise ValueError(f"pp_layer_split {self.pp_layer_split} covers {sum(self.pp_layer_split)} layers; "
                                 f"the model has {num_layers}")
            return self.pp_layer_split
        if pp > num_layers:
            raise ValueError(f"pipeline_parallel_size ({pp}) exceeds the number of layers ({num_layers})")
        base, extra = divmod(num_layers, pp)
        return tuple(base + (1 if i < extra else 0) for i in range(pp))

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


ADMISSION_POLICIES = ("greedy", "lookahead")


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    # pp == 1: keep a second plan in flight whose decodes take their input token from the previous
    # step's sample on the device, so scheduling and input preparation overlap the GPU's work
    async_scheduling: bool = True
    # "greedy": admit when the next prompt chunk fits now, preempt (recompute) when the pool runs out;
    # "lookahead": admit only when the projected peak of the running requests fits (engine/admission.py)
    admission: str = "greedy"

    def __post_init__(self) -> None:
        if self.admission not in ADMISSION_POLICIES:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION_POLICIES)}, got {self.admission!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len})"
            )


@dataclass(frozen=True)
class DeviceConfig:
    device: str  # "cpu" or "cuda[:i]", resolved

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    parallel: ParallelConfig
    scheduler: SchedulerConfig
    device: DeviceConfig
    seed: int = 0
    enforce_eager: bool = False
    # decode batch sizes with a CUDA graph (max_num_seqs is always added); None: worker/cuda_graph.DEFAULT_SIZES
    cuda_graph_sizes: tuple[int, ...] | None = None
