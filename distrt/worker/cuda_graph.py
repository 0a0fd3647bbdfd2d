"""CUDA graphs for decode steps: one graph per padded batch size, sharing one memory pool.

Static buffers (captured addresses) are filled before each replay:

    rows [0, bs)        the real requests of this step
    rows [bs, graph_bs) padding: slot -1 (no KV write), seq_len 1, logits discarded

With pipeline parallelism each stage captures its own share: the first starts from input ids,
later ones from a static [2, n, hidden] (hidden; residual) buffer the received activations are
copied into; the last ends in logits, the others in a [2, bs, hidden] output the runner sends on.
The send/recv stay outside the graphs (one message per hop, as in eager mode).

`eager_replay` (tests on CPU, where there are no CUDA graphs) runs the same static-buffer plumbing
with a plain forward in place of each replay.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from distrt.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


DEFAULT_SIZES = (1, 2, 4, 8, *range(16, 257, 16), *range(288, 1025, 32))


def capture_sizes(max_num_seqs: int, sizes: tuple[int, ...] | None = None) -> list[int]:
    """Decode batch sizes to capture: `sizes` (default DEFAULT_SIZES) below max_num_seqs, then max_num_seqs
    itself, so every decode batch pads up to a captured size (a batch of 260 runs the 288 graph by default)."""
    out = [s for s in (DEFAULT_SIZES if sizes is None else sizes) if s < max_num_seqs]
    return out + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_num_seqs: int, max_blocks_per_seq: int, device: torch.device, *, first: bool = True,
                 last: bool = True, hidden_size: int = 0, dtype: torch.dtype | None = None,
                 sizes: tuple[int, ...] | None = None) -> None:
        self.model = model
        self.first, self.last = first, last
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs, sizes)
        n = self.sizes[-1]
        self.max_blocks = max_blocks_per_seq
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.stage_in = None if first else torch.zeros((2, n, hidden_size), dtype=dtype, device=device)
        self.graphs: dict[int, Any] = {}
        self.logits: dict[int, torch.Tensor] = {}  # per size: logits (last stage) or [2, bs, hidden] to send
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[: bs + 1],
                                 seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
                                 max_query_len=1, max_seq_len=self.max_blocks, is_decode_only=True)

    def _forward(self, bs: int) -> torch.Tensor:
        if self.stage_in is None:
            hidden, residual = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._meta(bs))
        else:
            hidden, residual = self.model(None, self.positions[:bs], self.kv_caches, self._meta(bs),
                                          hidden=self.stage_in[0, :bs], residual=self.stage_in[1, :bs])
        if self.last:
            return self.model.compute_logits(hidden)
        return torch.stack((hidden, residual))

    @torch.inference_mode()
    def capture(self, eager_replay: bool = False) -> None:
        if eager_replay:
            for bs in self.sizes:
                self.logits[bs] = self._forward(bs)
                self.graphs[bs] = _EagerReplay(self, bs)
            return
        for bs in reversed(self.sizes):  # largest first: later graphs reuse its pool memory
            for _ in range(2):  # compile / autotune outside the capture
                self._forward(bs)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.logits[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[bs] = g
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def padded_size(self, bs: int) -> int | None:
        for s in self.sizes:
            if s >= bs:
                return s
        return None

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor | None, positions: torch.Tensor, meta: AttentionMetadata,
            stage_in: torch.Tensor | None = None) -> torch.Tensor:
        """Inputs on the device for bs real rows (ids, or the received [2, bs, hidden] on a later
        stage); returns [bs, vocab] logits or the [2, bs, hidden] to send (views of static buffers)."""
        bs = positions.shape[0]
        gbs = self.padded_size(bs)
        assert gbs is not None and meta.block_tables.shape[1] <= self.max_blocks
        if self.stage_in is None:
            assert input_ids is not None
            self.input_ids[:bs].copy_(input_ids)
        else:
            assert stage_in is not None and stage_in.shape[1] == bs
            self.stage_in[:, :bs].copy_(stage_in)
        self.positions[:bs].copy_(positions)
        self.slot_mapping[:bs].copy_(meta.slot_mapping)
        self.seq_lens[:bs].copy_(meta.seq_lens)
        self.block_tables[:bs, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if gbs > bs:
            self.slot_mapping[bs:gbs].fill_(-1)
            self.seq_lens[bs:gbs].fill_(1)
        self.graphs[gbs].replay()
        out = self.logits[gbs]
        return out[:bs] if self.last else out[:, :bs]


class _EagerReplay:
    """Stands in for a captured graph on CPU: recomputes into the same static output."""

    def __init__(self, graphs: DecodeGraphs, bs: int) -> None:
        self.graphs, self.bs = graphs, bs

    def replay(self) -> None:
        self.graphs.logits[self.bs].copy_(self.graphs._forward(self.bs))
