"""Runs one forward over a ragged batch (prefill chunks and decodes together) on one device,
reading and writing the paged KV cache, and samples the requests whose sequence it completed.

With pipeline parallelism it runs its stage only: a later stage takes (hidden, residual) from the
previous stage instead of embedding ids, an earlier stage sends them on instead of sampling
(worker/pipeline.py)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from distrt.config import EngineConfig
from distrt.kernels.kv_cache import FP8_KV_DTYPE
from distrt.layers.attention import AttentionMetadata
from distrt.layers.sampler import DeviceSample, Sampler, SamplerOutput, SamplerRow
from distrt.models.model_loader import build_model
from distrt.models.shard import ShardContext
from distrt.worker.block_table import BlockTableRows
from distrt.worker.cuda_graph import DecodeGraphs
from distrt.worker.pipeline import StageLink
from distrt.worker.request_state import RequestState

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_KV_DTYPES = {"fp8": FP8_KV_DTYPE, "fp8_e4m3": FP8_KV_DTYPE}  # "auto": the model dtype
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class BatchInputs:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    sample_rows: list[int]  # index into the batch of requests that get a token
    sample_token_idx: torch.Tensor  # int64 [S], row in [T] whose logits to sample


@dataclass
class Launched:
    """A step whose GPU work is queued: `sample` (output rank) turns into tokens on `finish`;
    `tokens` (every rank when shared) feeds the next step's deferred inputs on the device."""

    rows: list[int]  # indices of the step's states that get a token
    sample: DeviceSample | None
    tokens: torch.Tensor | None


class ModelRunner:
    def __init__(self, config: EngineConfig, ctx: ShardContext) -> None:
        self.config = config
        self.ctx = ctx
        self.device = ctx.device
        self.model = build_model(config.model, ctx)
        self.sampler = Sampler()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.graphs: DecodeGraphs | None = None
        self.time_stages = False
        self.received_event: torch.cuda.Event | None = None
        sc = config.scheduler
        self.block_rows = BlockTableRows(-(-sc.max_model_len // config.cache.block_size), sc.max_num_seqs + 8)

    # -- KV cache ---------------------------------------------------------------------------
    @property
    def num_local_layers(self) -> int:
        return len(self.model.layers)

    @property
    def kv_dtype(self) -> torch.dtype:
        return _KV_DTYPES.get(self.config.cache.kv_cache_dtype, self.ctx.dtype)

    def kv_block_bytes(self) -> int:
        m = self.config.model
        elem = torch.empty((), dtype=self.kv_dtype).element_size()  # fp8: 1 byte, twice the blocks of bf16
        heads = self.model.kv_heads_per_rank
        return self.num_local_layers * 2 * self.config.cache.block_size * heads * m.head_dim * elem

    def determine_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        if cache.kv_cache_memory > 1:
            budget = int(cache.kv_cache_memory)
        elif self.device.type == "cuda":
            budget = int(self._profile_free_cuda_bytes() * cache.kv_cache_memory)
        else:
            budget = int(cache.cpu_kv_budget_bytes * cache.kv_cache_memory)
        return max(1, budget // self.kv_block_bytes())

    def _profile_free_cuda_bytes(self) -> int:
        """Free memory after weights and a forward over a full token budget (its activation peak)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        n = min(self.config.scheduler.max_num_batched_tokens, self.config.scheduler.max_model_len)
        bs = self.config.cache.block_size
        self.init_kv_cache(-(-n // bs))
        state = RequestState("profile", [0] * n, n, list(range(-(-n // bs))), 0, _profile_spec())  # type: ignore[arg-type]
        self.execute([state], [n])
        self.release_state(state)
        torch.cuda.synchronize(self.device)
        self.kv_caches = []
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(0, free - peak)

    def init_kv_cache(self, num_blocks: int) -> None:
        if (self.kv_dtype == FP8_KV_DTYPE and self.device.type == "cuda"
                and torch.cuda.get_device_capability(self.device) < (8, 9)):
            raise ValueError("kv_cache_dtype='fp8' needs a GPU of compute capability >= 8.9 (Ada, Hopper): "
                             "Triton has no float8 e4m3 conversions before it")
        m = self.config.model
        shape = (num_blocks, self.config.cache.block_size, self.model.kv_heads_per_rank, m.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
                          for _ in range(self.num_local_layers)]
        self.num_blocks = num_blocks

    def capture_graphs(self) -> None:
        """Decode CUDA graphs for batch sizes up to max_num_seqs (CUDA only, unless enforce_eager;
        DISTRT_EAGER_GRAPHS=1 runs the graph plumbing eagerly on CPU, for tests)."""
        emulate = os.environ.get("DISTRT_EAGER_GRAPHS") == "1"
        if (self.device.type != "cuda" and not emulate) or self.config.enforce_eager:
            return
        max_blocks = -(-self.config.scheduler.max_model_len // self.config.cache.block_size)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.config.scheduler.max_num_seqs, max_blocks,
                                   self.device, first=self.ctx.is_first_stage, last=self.ctx.is_last_stage,
                                   hidden_size=self.config.model.hidden_size, dtype=self.ctx.dtype,
                                   sizes=self.config.cuda_graph_sizes)
        self.graphs.capture(eager_replay=self.device.type != "cuda")
        if self.device.type == "cuda":  # what the kv_cache_memory fraction left unused after the graphs
            free, total = torch.cuda.mem_get_info(self.device)
            logger.info("after KV pool and CUDA graphs: %.2f GiB free of %.2f GiB, torch reserved %.2f GiB",
                        free / 2**30, total / 2**30, torch.cuda.memory_reserved(self.device) / 2**30)

    def release(self) -> None:
        """Free the KV pool and CUDA graphs (the graphs hold the pool's addresses)."""
        self.graphs = None
        self.kv_caches = []
        if self.device.type == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()

    # -- one step -----------------------------------------------------------------------------
    def prepare(self, states: list[RequestState], num_tokens: list[int],
                fills: dict[int, int] | None = None, prev_tokens: torch.Tensor | None = None) -> BatchInputs:
        """`fills`: state index -> row of `prev_tokens` (the previous step's samples, on the device)
        that is the input id of that state's one scheduled token (a deferred decode).

        One pass over the states gathers what only they know (start, length, block-table row, input
        ids); positions, slots, offsets and the padded block tables are numpy over the whole batch."""
        bs = self.config.cache.block_size
        nb = len(states)
        sync = self.block_rows.sync
        starts = [0] * nb
        rows = [0] * nb
        ends_tok = [0] * nb
        ids: list[int] = []
        max_blocks = 1
        decode_only = True
        for i, (st, n) in enumerate(zip(states, num_tokens)):
            s = starts[i] = st.num_computed_tokens
            rows[i] = sync(st)
            toks = st.token_ids
            ends_tok[i] = len(toks)
            if n == 1:
                ids.append(toks[s])
            else:
                decode_only = False
                ids.extend(toks[s: s + n])
            if st.table_len > max_blocks:
                max_blocks = st.table_len
        cnt = np.asarray(num_tokens, dtype=np.int64)
        start = np.asarray(starts, dtype=np.int64)
        row = np.asarray(rows, dtype=np.int64)
        end = start + cnt
        qsl = np.zeros(nb + 1, dtype=np.int64)
        np.cumsum(cnt, out=qsl[1:])
        t = int(qsl[-1])
        if decode_only:
            pos, tok_row = start, row
        else:
            tok_row = np.repeat(row, cnt)
            pos = np.arange(t, dtype=np.int64) + np.repeat(start - qsl[:-1], cnt)
        table = self.block_rows.table
        slots = table[tok_row, pos // bs].astype(np.int64) * bs + pos % bs
        sampled = end == np.asarray(ends_tok, dtype=np.int64)
        sample_rows = np.flatnonzero(sampled)
        sample_idx = qsl[1:][sampled] - 1
        fill_pos = fill_src = _EMPTY
        if fills:
            for i in fills:
                if num_tokens[i] != 1 or states[i].num_pending != 1:
                    raise RuntimeError(f"deferred input of {states[i].req_id}: {num_tokens[i]} tokens scheduled, "
                                       f"{states[i].num_pending} placeholders")
            fill_pos = qsl[np.fromiter(fills.keys(), dtype=np.int64, count=len(fills)) + 1] - 1
            fill_src = np.fromiter(fills.values(), dtype=np.int64, count=len(fills))
        # two host buffers, two copies: [ids | positions | slots | sample_idx | fills] and [qsl | seq_lens | tables]
        h64 = torch.from_numpy(np.concatenate([np.asarray(ids, dtype=np.int64), pos, slots, sample_idx,
                                               fill_pos, fill_src]))
        h32 = torch.from_numpy(np.concatenate([qsl.astype(np.int32), end.astype(np.int32),
                                               self.block_rows.gather(row, max_blocks).reshape(-1)]))
        if self.device.type == "cuda":
            d64 = h64.pin_memory().to(self.device, non_blocking=True)
            d32 = h32.pin_memory().to(self.device, non_blocking=True)
        else:
            d64, d32 = h64, h32
        meta = AttentionMetadata(
            slot_mapping=d64[2 * t: 3 * t],
            query_start_loc=d32[: nb + 1],
            seq_lens=d32[nb + 1: 2 * nb + 1],
            block_tables=d32[2 * nb + 1:].view(nb, max_blocks),  # [B, max_blocks]
            max_query_len=int(cnt.max()),
            max_seq_len=int(end.max()),
            is_decode_only=decode_only,
        )
        input_ids = d64[:t]
        ns = len(sample_idx)
        if len(fill_pos):
            assert prev_tokens is not None, "deferred inputs need the previous step's samples"
            nf = len(fill_pos)
            f = d64[3 * t + ns:]
            input_ids[f[:nf]] = prev_tokens[f[nf:]]
        return BatchInputs(input_ids=input_ids, positions=d64[t: 2 * t], meta=meta, sample_rows=sample_rows.tolist(),
                           sample_token_idx=d64[3 * t: 3 * t + ns])

    def release_state(self, st: RequestState) -> None:
        """The worker dropped st: its block-table row is free again."""
        self.block_rows.release(st)

    @torch.inference_mode()
    def forward_logits(self, inputs: BatchInputs) -> torch.Tensor:
        g = self.graphs
        if g is not None and inputs.meta.is_decode_only and g.padded_size(inputs.input_ids.shape[0]) is not None:
            # one token per row; a row may be a 1-token prefill chunk that is not sampled
            return g.run(inputs.input_ids, inputs.positions, inputs.meta)[inputs.sample_token_idx]
        hidden, _ = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        return self.model.compute_logits(hidden[inputs.sample_token_idx])

    def _mark_received(self) -> None:
        """A later stage's work starts once the previous stage's activations are in (pipeline bubbles
        count as idle: Worker's step timing starts here when `time_stages` is set)."""
        if self.time_stages:
            self.received_event = torch.cuda.Event(enable_timing=True)
            self.received_event.record()

    @torch.inference_mode()
    def forward_stage(self, inputs: BatchInputs, link: StageLink | None) -> torch.Tensor | None:
        """A pipeline stage's share of the forward: logits of the sampled rows on the last stage,
        None elsewhere (after sending the activations on). Without a link (profiling) a later stage
        starts from zeros and an earlier one keeps its output."""
        first, last = self.ctx.is_first_stage, self.ctx.is_last_stage
        g = self.graphs
        t = inputs.positions.shape[0]
        if link is not None and g is not None and inputs.meta.is_decode_only and g.padded_size(t) is not None:
            stage_in = None if first else link.recv_stacked(t)
            self._mark_received()
            out = g.run(inputs.input_ids if first else None, inputs.positions, inputs.meta, stage_in)
            if not last:
                link.send_stacked(out)
                return None
            return out[inputs.sample_token_idx]
        hidden = residual = None
        if not first:
            t = inputs.positions.shape[0]
            if link is not None:
                hidden, residual = link.recv(t)
                self._mark_received()
            else:
                hidden = torch.zeros(t, self.config.model.hidden_size, dtype=self.ctx.dtype, device=self.device)
                residual = torch.zeros_like(hidden)
        hidden, residual = self.model(inputs.input_ids if first else None, inputs.positions, self.kv_caches,
                                      inputs.meta, hidden=hidden, residual=residual)
        if not last:
            if link is not None:
                assert residual is not None
                link.send(hidden, residual)
            return None
        return self.model.compute_logits(hidden[inputs.sample_token_idx])

    @torch.inference_mode()
    def execute(self, states: list[RequestState], num_tokens: list[int], link: StageLink | None = None,
                sample: bool = True) -> tuple[list[int], SamplerOutput]:
        """Forward the batch and wait for its tokens: (indices of states that got one, sampler output)."""
        return self.finish(self.launch(states, num_tokens, link, sample))

    @torch.inference_mode()
    def launch(self, states: list[RequestState], num_tokens: list[int], link: StageLink | None = None,
               sample: bool = True, fills: dict[int, int] | None = None, prev_tokens: torch.Tensor | None = None,
               share: bool = False) -> Launched:
        """Queues the batch's forward and sampling on the device (no host sync). Only the last stage
        has logits; only where `sample` (the output rank) are they turned into tokens. `share`
        (pp == 1, tp > 1): the output rank broadcasts the sampled ids over the TP group, so every
        rank can feed them to the next step's deferred inputs."""
        self.received_event = None  # this step's (set by a later pipeline stage when its input arrives)
        inputs = self.prepare(states, num_tokens, fills, prev_tokens)
        if self.ctx.pp_size == 1:
            logits = self.forward_logits(inputs)
        else:
            logits = self.forward_stage(inputs, link)
        if logits is None or not inputs.sample_rows:
            return Launched([], None, None)
        ds = None
        if sample:
            rows = []
            for i in inputs.sample_rows:
                st = states[i]
                pen = st.sampling.needs_penalties
                rows.append(SamplerRow(st.sampling, st.num_output_tokens, st.token_ids[: st.num_prompt_tokens] if pen else [],
                                       st.token_ids[st.num_prompt_tokens:] if pen else []))
            ds = self.sampler.sample(logits, rows)
            tokens: torch.Tensor | None = ds.tokens
        else:
            tokens = torch.empty(len(inputs.sample_rows), dtype=torch.int64, device=self.device) if share else None
        if share and self.ctx.tp_size > 1:
            assert tokens is not None
            tokens = self.ctx.tp_comm.broadcast(tokens, src=0)
        if ds is not None:
            ds.start_copy()
        return Launched(inputs.sample_rows, ds, tokens)

    @staticmethod
    def finish(launched: Launched) -> tuple[list[int], SamplerOutput]:
        if launched.sample is None:
            return [], SamplerOutput([], [])
        return launched.rows, launched.sample.to_host()


def _profile_spec():  # type: ignore[no-untyped-def]
    from distrt.messages import SamplingSpec

    return SamplingSpec(seed=0)


def resolve_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]
