"""The LLM facade (vLLM's shape): resolves the config, picks the executor, runs the engine loop."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from tqdm import tqdm

from distrt.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig,
                           check_graph_sizes)
from distrt.engine.llm_engine import LLMEngine, PromptInput
from distrt.engine.outputs import RequestOutput
from distrt.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16",
                "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or device.startswith("cuda"):
        return device
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")


def resolve_dtype(dtype: str, device: str, checkpoint_dtype: str | None) -> str:
    name = _DTYPE_NAMES.get(str(dtype).replace("torch.", ""))
    if name is None:
        raise ValueError(f"dtype must be one of auto, float32, float16, bfloat16, got {dtype!r}")
    if name != "auto":
        return name
    if device == "cpu":
        return "float32"
    return checkpoint_dtype if checkpoint_dtype in ("float16", "bfloat16") else "bfloat16"


def load_model_config(model: str, dtype: str, device: str) -> ModelConfig:
    from distrt.models.default_model import resolve_model
    from distrt.models.shapes import is_shape, shape_config

    kind, path = ("shape", model) if is_shape(model) else resolve_model(model)
    if kind == "shape":
        raw = shape_config(model)
    elif kind == "gguf":
        from distrt.models.gguf_loader import load_gguf_config

        raw = load_gguf_config(path)
    else:
        from distrt.models.loader import load_hf_config

        raw = load_hf_config(path)
    from distrt.models.registry import model_class

    archs = raw.get("architectures") or ["<none>"]
    model_class(archs[0])  # unsupported architectures fail here, before any weight is read
    ckpt = raw.get("torch_dtype") or raw.get("dtype")
    return ModelConfig.from_hf_dict(raw, path=path, kind=kind, dtype=resolve_dtype(dtype, device, ckpt if kind != "gguf" else None))


class LLM:
    def __init__(
        self,
        model: str = "default",
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        kv_cache_memory: float = 0.9,
        num_kv_blocks: int | None = None,
        kv_cache_dtype: str = "auto",
        enable_chunked_prefill: bool = True,
        async_scheduling: bool = True,
        admission: str = "greedy",
        seed: int = 0,
        device: str = "auto",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        pp_layer_split: Sequence[int] | None = None,
        expert_parallel_size: int = 1,
        executor: str = "auto",
        enforce_eager: bool = False,
        cuda_graph_sizes: Sequence[int] | None = None,
        cluster: Any = None,
        step_timeout_s: float = 300.0,
        num_redundant_experts: int = 0,
        expert_rebalance_interval: int = 0,
        custom_all_reduce: bool = True,
        pipeline_micro_batches: int | None = None,
    ) -> None:
        from distrt.executor.factory import create_executor, resolve_executor_name

        graph_sizes = None if cuda_graph_sizes is None else check_graph_sizes(cuda_graph_sizes)
        dev = resolve_device(device)
        mcfg = load_model_config(model, dtype, dev)
        limit = mcfg.max_position_embeddings
        window = mcfg.hf_config.get("sliding_window") if mcfg.hf_config.get("use_sliding_window", True) else None
        if isinstance(window, int) and window > 0 and mcfg.model_type == "mistral":
            limit = min(limit, window)  # beyond the window attention would differ; cap instead of silently diverging
        if max_model_len is None:
            max_model_len = limit
        elif not isinstance(max_model_len, int) or not 1 < max_model_len <= limit:
            raise ValueError(f"max_model_len must be an integer in [2, {limit}] for this model, got {max_model_len!r}")
        mcfg.check_tensor_parallel(tensor_parallel_size)
        if not isinstance(expert_parallel_size, int) or expert_parallel_size < 1 or tensor_parallel_size % expert_parallel_size:
            raise ValueError(f"expert_parallel_size ({expert_parallel_size}) must divide tensor_parallel_size "
                             f"({tensor_parallel_size}): experts are split inside the tensor-parallel group")
        num_experts = mcfg.hf_config.get("num_local_experts") or mcfg.hf_config.get("num_experts")
        if expert_parallel_size > 1 and (not num_experts or num_experts % expert_parallel_size):
            raise ValueError(f"expert_parallel_size={expert_parallel_size} needs a MoE model whose expert count "
                             f"is divisible by it (this model has {num_experts or 'no'} experts)")
        parallel = ParallelConfig(tensor_parallel_size, pipeline_parallel_size, expert_parallel_size,
                                  resolve_executor_name(executor, tensor_parallel_size * pipeline_parallel_size),
                                  step_timeout_s=step_timeout_s, num_redundant_experts=num_redundant_experts,
                                  expert_rebalance_interval=expert_rebalance_interval,
                                  custom_all_reduce=custom_all_reduce, pipeline_micro_batches=pipeline_micro_batches,
                                  pp_layer_split=None if pp_layer_split is None else tuple(pp_layer_split))
        parallel.stage_layers(mcfg.num_layers)
        sched = SchedulerConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens or (2048 if enable_chunked_prefill else max_model_len),
                                enable_chunked_prefill=enable_chunked_prefill, async_scheduling=async_scheduling,
                                admission=admission)
        self.config = EngineConfig(model=mcfg, cache=CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory,
                                                                 num_kv_blocks=num_kv_blocks, kv_cache_dtype=kv_cache_dtype),
                                   parallel=parallel, scheduler=sched, device=DeviceConfig(dev), seed=seed,
                                   enforce_eager=enforce_eager,
                                   cuda_graph_sizes=graph_sizes)
        from distrt.engine.tokenizer import load_tokenizer

        if mcfg.kind == "shape":
            from distrt.models.shapes import synthetic_tokenizer

            self.tokenizer = synthetic_tokenizer(mcfg.vocab_size)
        else:
            self.tokenizer = load_tokenizer(mcfg.kind, mcfg.path)
        self._executor = create_executor(self.config) if cluster is None else cluster.create_executor(self.config)
        try:
            self.engine = LLMEngine(self.config, self.tokenizer, self._executor)
        except BaseException:
            self._executor.shutdown()
            raise

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        # validate everything before queueing anything, so a bad prompt leaves the engine untouched
        for p, sp in zip(prompts, params):
            sp.validate()
            _, ids = self.engine.tokenize_prompt(p)
            self.engine.validate_prompt_ids(ids)
        ids = []
        for p, sp in zip(prompts, params):
            rid = self.engine.next_request_id()
            self.engine.add_request(rid, p, sp, stream=False)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        from distrt.engine.tokenizer import apply_chat_template

        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": apply_chat_template(self.tokenizer, conv, add_generation_prompt)}
                   for conv in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)  # type: ignore[arg-type]

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests() and len(done) < len(wanted):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

