"""Lookahead admission: admit a waiting request only if the KV pool holds the projected peak.

The default policy ("greedy", vLLM's) admits a request when its next prompt chunk fits now and
preempts the newest running request when a decode later runs out of blocks; the victim's work is
recomputed. "lookahead" (TensorRT-LLM users know the idea as a no-evict capacity policy, here
without reserving every request's maximum for its whole life) projects the pool forward instead:

    request i holds ceil(min(c_i + max(0, t - p_i), f_i) / block_size) blocks at step t < s_i, 0 after
        c_i  tokens it holds now, counting its whole prompt (a prefill in progress will need it)
        p_i  steps until its prefill is done (chunks queued ahead of it share the token budget)
        f_i  its final length: prompt + max_tokens, capped at max_model_len (max_model_len without max_tokens)
        s_i  = p_i + f_i - c_i: the step it finishes and frees its blocks (one token per decode step)

    usage(t) = sum_i blocks_i(t) only rises between releases, so its peak is at t = 0 or just before
    some s_j: the candidate is admitted when max over those points <= num_blocks - watermark.

Pacing: admitted together, equal requests age together and free their blocks together, so the pool
swings between half full (all young) and full (all old) and the projection above caps the batch at
what fits when all are old. Admitted one by one as others finish, their ages spread evenly and the
pool holds ~1/0.75 as many. So admissions are also paced to the steady-state rate of the request at
the head of the queue, PACE_FACTOR x pool / (its mean tokens x its lifetime in steps) per step
(a token bucket, burst 1 or that rate): for 1000 in / 1000 out on an H100's 457k-token bf16 pool,
one admission every ~2 steps; for 128/128, many per step (no limit in practice).

It is a projection, not a guarantee: a request that stops early (EOS) only frees blocks sooner, but
one that falls behind (budget shared with long prefills, async scheduling's in-flight tokens) frees
them later than projected; the scheduler's preemption still covers that. With equal-length requests
(offline benchmarks) it keeps more sequences running than a static max_num_seqs sized for the worst
case, since older requests free blocks before younger ones reach their peak.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distrt.engine.request import Request

WATERMARK_FRACTION = 0.01  # of the pool, kept free for projection error (vLLM keeps 1% at admission too)
PACE_FACTOR = 1.5  # x the steady-state admission rate; benchmarks/sched_sim.py --admission lookahead ranks it


def final_tokens(req: Request) -> int:
    """The most tokens req can reach: prompt + max_tokens, capped at max_model_len."""
    cap = req.max_model_len
    if req.params.max_tokens is not None:
        cap = min(cap, req.num_prompt_tokens + req.params.max_tokens)
    return max(cap, req.num_tokens)


class LookaheadAdmission:
    def __init__(self, num_blocks: int, block_size: int, token_budget: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.token_budget = token_budget
        self.limit = num_blocks - max(1, int(num_blocks * WATERMARK_FRACTION))
        self.pace_factor = PACE_FACTOR
        self._credit = 1.0  # admissions the pacing allows now

    def pace_rate(self, req: Request) -> float:
        """Admissions per step that keep requests like req evenly aged in a full pool."""
        f, prompt = final_tokens(req), req.num_prompt_tokens
        life = max(1, f - prompt) + -(-prompt // self.token_budget)  # decode steps + prefill steps
        mean_tokens = prompt + (f - prompt) / 2
        return self.pace_factor * self.limit * self.block_size / (max(1.0, mean_tokens) * life)

    def tick(self, head: Request | None) -> None:
        """Once per scheduled step: the pacing bucket refills at the head-of-queue request's rate."""
        if head is None:
            self._credit = 1.0
            return
        rate = self.pace_rate(head)
        self._credit = min(max(1.0, rate), self._credit + rate)

    def allows(self, running: Sequence[Request], candidate: Request) -> bool:
        """Paced and projected to fit (with nothing running, always: nothing would free blocks)."""
        return not running or (self._credit >= 1.0 and self.fits(running, candidate))

    def took(self) -> None:
        """The scheduler admitted a request: it spends one pacing credit."""
        self._credit = max(0.0, self._credit - 1.0)

    def _profile(self, running: Sequence[Request], extra: Sequence[Request]) -> tuple[np.ndarray, ...]:
        reqs = [*running, *extra]
        n = len(reqs)
        c = np.empty(n, dtype=np.int64)
        f = np.empty(n, dtype=np.int64)
        left = np.empty(n, dtype=np.int64)  # prompt tokens still to prefill
        for i, r in enumerate(reqs):
            c[i] = r.num_tokens
            f[i] = final_tokens(r)
            left[i] = max(0, r.num_prompt_tokens - r.num_computed_tokens)
        decoding = int(np.count_nonzero(left[: len(running)] == 0))
        per_step = max(1, self.token_budget - decoding)  # prompt tokens a step can take after the decodes
        p = -(-np.cumsum(left) // per_step) * (left > 0)  # prefills are served in order
        s = p + f - c
        return c, f, p, s

    def fits(self, running: Sequence[Request], candidate: Request) -> bool:
        """Whether running + candidate never need more than the pool (minus the watermark). With nothing
        running it is always True: nothing would free blocks to wait for (a request longer than the
        pool is the greedy policy's case then, preemption included)."""
        if not running:
            return True
        c, f, p, s = self._profile(running, [candidate])
        t = np.unique(np.concatenate(([0], np.maximum(s - 1, 0))))  # [P] candidate peak times
        grown = np.minimum(c[None, :] + np.maximum(t[:, None] - p[None, :], 0), f[None, :])  # [P, N]
        blocks = np.where(t[:, None] < s[None, :], -(-grown // self.block_size), 0)
        return int(blocks.sum(axis=1).max()) <= self.limit
