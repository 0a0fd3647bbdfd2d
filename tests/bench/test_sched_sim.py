"""benchmarks/sched_sim.py: the real scheduler under a step cost model (CPU, no model)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import sched_sim  # noqa: E402


def test_every_token_is_produced_and_counted() -> None:
    rows = sched_sim.main(["--input-len", "32", "--output-len", "16", "--num-prompts", "8",
                           "--max-num-seqs", "4,8", "--kv-blocks", "64"])
    for r in rows:
        assert abs(r["output_tok_s"] * r["seconds"] - 8 * 16) < 1e-6 and r["preemptions"] == 0
    # all 8 at once: fewer steps (16 decode steps plus the prefill) than two waves of 4
    assert rows[1]["steps"] < rows[0]["steps"] and rows[1]["seconds"] < rows[0]["seconds"]


def test_short_kv_cache_preempts() -> None:
    # 8 sequences of up to 48 tokens need 24 blocks of 16; 16 blocks force preemptions (recomputed later)
    (row,) = sched_sim.main(["--input-len", "32", "--output-len", "16", "--num-prompts", "8",
                             "--max-num-seqs", "8", "--kv-blocks", "16"])
    assert row["preemptions"] > 0 and abs(row["output_tok_s"] * row["seconds"] - 8 * 16) < 1e-6
