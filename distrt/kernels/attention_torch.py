"""Paged attention in plain torch for the CPU engine path: each sequence's own cache slots, one SDPA.

`paged_attention_ref` (paged_attention.py) stays the oracle the kernels are tested against; it gathers
whole blocks and zeroes whatever lies past each sequence (unowned slots may hold anything, even NaN).
This path gathers exactly positions 0..seq_len-1 of each sequence through its block table, and a
position past a sequence's end reads that sequence's slot 0 instead (real, finite data that the mask
then hides), so no slot outside the sequence is ever read and nothing needs zeroing. The scores and
softmax run in torch's scaled_dot_product_attention (float32), GQA without repeating the keys.
On the embedded SmolLM2-135M (16 prompts x 64 tokens, 2 CPU threads) it took the attention share of
a run from ~28% to ~10% (benchmarks/cpu_smollm2.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                          scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Same contract as paged_attention_ref: q [T, H, D] (ragged by query_start_loc) -> [T, H, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return q.new_empty(q.shape)
    device = q.device
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]  # [B]
    s_lens = seq_lens.long()
    max_q, max_s = int(q_lens.max()), int(s_lens.max())

    pos = torch.arange(max_s, device=device)
    valid = pos[None, :] < s_lens[:, None]  # [B, S]
    pos = torch.where(valid, pos[None, :], 0)  # past the end: the sequence's own position 0
    blocks = block_tables.long().gather(1, pos // block_size)  # [B, S]
    slots = (blocks * block_size + pos % block_size).view(-1)
    flat = (num_blocks * block_size, num_kv_heads, head_dim)
    # (reshape is a view of the engine's contiguous caches; another layout is copied first)
    keys = k_cache.reshape(flat).index_select(0, slots).view(batch, max_s, num_kv_heads, head_dim)
    vals = v_cache.reshape(flat).index_select(0, slots).view(batch, max_s, num_kv_heads, head_dim)

    if max_q == 1:  # decode-only: one query per sequence, already in batch order
        q_pad = q.view(batch, 1, num_heads, head_dim)
        tok_seq = tok_row = None
    else:
        tok = torch.arange(num_tokens, device=device)
        tok_seq = torch.searchsorted(qsl[1:], tok, right=True)  # [T]
        tok_row = tok - qsl[tok_seq]
        q_pad = q.new_zeros(batch, max_q, num_heads, head_dim)
        q_pad[tok_seq, tok_row] = q
    q_pos = (s_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]  # [B, Q]
    # every real query row sees at least itself; padded rows (never read back) see position 0
    allowed = ((torch.arange(max_s, device=device)[None, None, :] <= q_pos[:, :, None].clamp(min=0))
               & valid[:, None, :])  # [B, Q, S]
    out = F.scaled_dot_product_attention(
        q_pad.float().transpose(1, 2), keys.float().transpose(1, 2), vals.float().transpose(1, 2),
        attn_mask=allowed[:, None], scale=scale * k_scale, enable_gqa=num_heads != num_kv_heads,
    ).transpose(1, 2)  # [B, Q, H, D]
    if v_scale != 1.0:
        out = out * v_scale
    if tok_seq is None:
        return out.reshape(num_tokens, num_heads, head_dim).to(q.dtype)
    return out[tok_seq, tok_row].to(q.dtype)
