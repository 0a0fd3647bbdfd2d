"""CUDA graphs for decode steps: one graph per padded batch size, sharing one memory pool.

Static buffers (captured addresses) are filled before each replay:

    rows [0, bs)        the real requests of this step
    rows [bs, graph_bs) padding: slot -1 (no KV write), seq_len 1, logits discarded
"""

from __future__ import annotations

import logging

import torch

from distrt.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    out = [s for s in sizes if s < max_num_seqs]
    return out + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_num_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.max_blocks = max_blocks_per_seq
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[: bs + 1],
                                 seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
                                 max_query_len=1, max_seq_len=self.max_blocks, is_decode_only=True)

    def _forward(self, bs: int) -> torch.Tensor:
        hidden, _ = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._meta(bs))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
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
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Inputs on the device for bs real rows; returns [bs, vocab] logits (a view of a static buffer)."""
        bs = input_ids.shape[0]
        gbs = self.padded_size(bs)
        assert gbs is not None and meta.block_tables.shape[1] <= self.max_blocks
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        self.slot_mapping[:bs].copy_(meta.slot_mapping)
        self.seq_lens[:bs].copy_(meta.seq_lens)
        self.block_tables[:bs, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if gbs > bs:
            self.slot_mapping[bs:gbs].fill_(-1)
            self.seq_lens[bs:gbs].fill_(1)
        self.graphs[gbs].replay()
        return self.logits[gbs][:bs]
