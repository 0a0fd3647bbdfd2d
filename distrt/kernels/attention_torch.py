"""Paged attention in plain torch for the CPU engine path: each sequence's own cache slots, one SDPA.

`paged_attention_ref` (paged_attention.py) stays the oracle the kernels are tested against; it gathers
whole blocks and zeroes whatever lies past each sequence (unowned slots may hold anything, even NaN).
This path gathers exactly positions 0..seq_len-1 of each sequence through its block table, and a
position past a sequence's end reads that sequence's slot 0 instead (real, finite data that the mask
then hides), so no slot outside the sequence is ever read and nothing needs zeroing. The scores and
softmax run in torch's scaled_dot_product_attention (float32), GQA without repeating the keys.
The gather plan (slots, mask, token rows) depends only on the step's metadata: layers share it through
`plan_cache` (AttentionMetadata.cpu_cache, one dict per step).
On the embedded SmolLM2-135M (16 prompts x 64 tokens, 2 CPU threads) attention went from ~28% of a
run (the reference) to ~15% (benchmarks/cpu_smollm2.py, profiled).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class GatherPlan(NamedTuple):
    slots: torch.Tensor  # int64 [B * S]: cache slot of each (sequence, position); past the end, slot 0's
    allowed: torch.Tensor  # bool [B, 1, Q, S]: causal and in-sequence
    tok_seq: torch.Tensor | None  # int64 [T]: each token's sequence (None: decode-only, T == B)
    tok_row: torch.Tensor | None  # int64 [T]: its row among its sequence's queries
    batch: int
    max_q: int
    max_s: int
    block_size: int


def gather_plan(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                num_tokens: int, block_size: int) -> GatherPlan:
    device = seq_lens.device
    batch = seq_lens.shape[0]
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]  # [B]
    s_lens = seq_lens.long()
    max_q, max_s = int(q_lens.max()), int(s_lens.max())
    pos = torch.arange(max_s, device=device)
    valid = pos[None, :] < s_lens[:, None]  # [B, S]
    own = torch.where(valid, pos[None, :], 0)  # past the end: the sequence's own position 0
    blocks = block_tables.long().gather(1, own // block_size)  # [B, S]
    slots = (blocks * block_size + own % block_size).view(-1)
    q_pos = (s_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]  # [B, Q]
    # every real query row sees at least itself; padded rows (never read back) see the whole sequence
    allowed = (pos[None, None, :] <= q_pos[:, :, None]) & valid[:, None, :]  # [B, Q, S]
    tok_seq = tok_row = None
    if max_q > 1:
        tok = torch.arange(num_tokens, device=device)
        tok_seq = torch.searchsorted(qsl[1:], tok, right=True)  # [T]
        tok_row = tok - qsl[tok_seq]
    return GatherPlan(slots, allowed[:, None], tok_seq, tok_row, batch, max_q, max_s, block_size)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                          scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                          plan_cache: dict | None = None) -> torch.Tensor:  # type: ignore[type-arg]
    """Same contract as paged_attention_ref: q [T, H, D] (ragged by query_start_loc) -> [T, H, D].
    plan_cache: a dict that lives for one step's metadata; the first layer fills it, the rest reuse it."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if num_tokens == 0 or seq_lens.shape[0] == 0:
        return q.new_empty(q.shape)
    plan = None if plan_cache is None else plan_cache.get("attention_torch")
    if plan is None or plan.block_size != block_size:
        plan = gather_plan(query_start_loc, seq_lens, block_tables, num_tokens, block_size)
        if plan_cache is not None:
            plan_cache["attention_torch"] = plan
    batch, max_q, max_s = plan.batch, plan.max_q, plan.max_s
    flat = (num_blocks * block_size, num_kv_heads, head_dim)
    # (reshape is a view of the engine's contiguous caches; another layout is copied first)
    keys = k_cache.reshape(flat).index_select(0, plan.slots).view(batch, max_s, num_kv_heads, head_dim)
    vals = v_cache.reshape(flat).index_select(0, plan.slots).view(batch, max_s, num_kv_heads, head_dim)
    if plan.tok_seq is None:  # decode-only: one query per sequence, already in batch order
        q_pad = q.view(batch, 1, num_heads, head_dim)
    else:
        q_pad = q.new_zeros(batch, max_q, num_heads, head_dim)
        q_pad[plan.tok_seq, plan.tok_row] = q
    out = F.scaled_dot_product_attention(
        q_pad.float().transpose(1, 2), keys.float().transpose(1, 2), vals.float().transpose(1, 2),
        attn_mask=plan.allowed, scale=scale * k_scale, enable_gqa=num_heads != num_kv_heads,
    ).transpose(1, 2)  # [B, Q, H, D]
    if v_scale != 1.0:
        out = out * v_scale
    if plan.tok_seq is None:
        return out.reshape(num_tokens, num_heads, head_dim).to(q.dtype)
    return out[plan.tok_seq, plan.tok_row].to(q.dtype)
