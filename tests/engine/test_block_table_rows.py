"""BlockTableRows (worker/block_table.py) and the numpy `prepare` built on it, against the
per-request formulas (slot = table[pos // bs] * bs + pos % bs, tables padded with block 0)."""

from __future__ import annotations

import numpy as np
import torch

from distrt import LLM
from distrt.messages import SamplingSpec
from distrt.worker.block_table import BlockTableRows
from distrt.worker.request_state import RequestState


def _state(rid: str, ntok: int, blocks: list[int], computed: int) -> RequestState:
    return RequestState(rid, list(range(100, 100 + ntok)), min(ntok, 5), list(blocks), computed, SamplingSpec(seed=0))


def test_rows_sync_grow_release() -> None:
    rows = BlockTableRows(width=2, rows=1)
    a, b = _state("a", 4, [3], 0), _state("b", 4, [5, 6, 7], 0)
    assert rows.sync(a) == 0 and rows.sync(b) == 1  # a second row and a wider table were needed
    assert rows.table.shape[0] >= 2 and rows.table.shape[1] >= 3
    a.block_ids += [9, 4]
    rows.sync(a)  # only the new tail is written
    assert rows.gather(np.array([1, 0]), 3).tolist() == [[5, 6, 7], [3, 9, 4]]
    rows.release(a)
    assert a.row == -1 and rows.table[0].sum() == 0 and rows.num_used == 1
    c = _state("c", 4, [8], 0)
    assert rows.sync(c) == 0 and rows.gather(np.array([0]), 3).tolist() == [[8, 0, 0]]  # zeroed padding


def test_prepare_matches_per_request_formulas() -> None:
    llm = LLM("shape:llama-tiny", dtype="float32", max_model_len=256, num_kv_blocks=64, block_size=4)
    runner = llm._executor.worker.runner
    bs = 4
    # a decode, a prefill chunk in the middle of a prompt, a whole prompt, another decode
    states = [_state("d1", 10, [7, 2, 5], 9), _state("p1", 12, [1, 3, 4], 3), _state("p2", 6, [11, 12], 0),
              _state("d2", 5, [20, 21], 4)]
    counts = [1, 5, 6, 1]
    inp = runner.prepare(states, counts)
    ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
    sample_rows, sample_idx = [], []
    for i, (st, n) in enumerate(zip(states, counts)):
        s = st.num_computed_tokens
        ids += st.token_ids[s:s + n]
        pos += list(range(s, s + n))
        slots += [st.block_ids[p // bs] * bs + p % bs for p in range(s, s + n)]
        qsl.append(qsl[-1] + n)
        seq_lens.append(s + n)
        if s + n == len(st.token_ids):
            sample_rows.append(i)
            sample_idx.append(qsl[-1] - 1)
    width = max(len(st.block_ids) for st in states)
    tables = [st.block_ids + [0] * (width - len(st.block_ids)) for st in states]
    assert inp.input_ids.tolist() == ids and inp.positions.tolist() == pos
    assert inp.meta.slot_mapping.tolist() == slots
    assert inp.meta.query_start_loc.tolist() == qsl and inp.meta.seq_lens.tolist() == seq_lens
    assert inp.meta.block_tables.tolist() == tables
    assert inp.sample_rows == sample_rows and inp.sample_token_idx.tolist() == sample_idx
    assert inp.meta.max_query_len == 6 and inp.meta.max_seq_len == 10 and not inp.meta.is_decode_only
    # decode-only batch, with one input deferred to the previous step's samples (row 1 of prev)
    states[3].token_ids.append(-1)
    states[3].num_pending = 1
    states[3].num_computed_tokens = 5
    prev = torch.tensor([40, 41, 42])
    dec = runner.prepare([states[0], states[3]], [1, 1], fills={1: 1}, prev_tokens=prev)
    assert dec.meta.is_decode_only and dec.input_ids.tolist() == [states[0].token_ids[9], 41]
    assert dec.meta.slot_mapping.tolist() == [5 * bs + 1, 21 * bs + 1]
    for st in states:
        runner.release_state(st)
    assert runner.block_rows.num_used == 0
    llm.shutdown()
