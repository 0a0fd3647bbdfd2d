"""A worker: one model shard (its TP slice of its pipeline stage's layers), its slice of the KV
pool, and the per-request state it needs to execute StepPlans. One per GPU (or per CPU rank in tests).

Token ids come only from the plans (messages.py): a worker appends the `new_token_ids` the
coordinator sends, never its own samples, so every stage and TP rank holds the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from distrt.config import EngineConfig
from distrt.messages import RequestId, StepPlan, StepResult, TokenLogprobs
from distrt.models.shard import ShardContext
from distrt.worker.model_runner import Launched, ModelRunner, resolve_dtype
from distrt.worker.pipeline import StageLink
from distrt.worker.profiling import StepProfiler
from distrt.worker.request_state import RequestState


@dataclass
class PendingStep:
    """A launched plan whose tokens are still on the device (see Worker.launch)."""

    step_id: int
    states: list[RequestState]
    launched: Launched | None
    t0: float
    expert_load: dict[int, tuple[int, ...]] | None = None
    start_event: Any = None  # CUDA events around the step's device work (output rank, CUDA only)
    end_event: Any = None


class Worker:
    def __init__(self, config: EngineConfig, *, tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0,
                 pp_size: int = 1, tp_comm: Any = None, pp_comm: Any = None, device: str | None = None) -> None:
        self.config = config
        dev = torch.device(device or config.device.device)
        if dev.type == "cuda":
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
        torch.manual_seed(config.seed)
        split = config.parallel.stage_layers(config.model.num_layers) if pp_size > 1 else None
        self.ctx = ShardContext(dtype=resolve_dtype(config.model.dtype), device=dev, tp_rank=tp_rank, tp_size=tp_size,
                                pp_rank=pp_rank, pp_size=pp_size, tp_comm=tp_comm, pp_comm=pp_comm, layer_split=split,
                                ep_size=config.parallel.expert_parallel_size,
                                num_redundant_experts=config.parallel.num_redundant_experts)
        self.runner = ModelRunner(config, self.ctx)
        self.link = StageLink(pp_comm, config.model.hidden_size, self.ctx.dtype) if pp_size > 1 else None
        # the output rank (TP rank 0 of the last stage) samples; the others' tokens would only be discarded
        self.samples = self.ctx.is_last_stage and tp_rank == 0
        self.states: dict[RequestId, RequestState] = {}
        # async scheduling (pp == 1): the last launched step's samples feed deferred inputs; with
        # tp > 1 the output rank broadcasts them so every rank has them (messages.py)
        self.share = pp_size == 1 and tp_size > 1 and config.scheduler.async_scheduling
        self._prev_tokens: torch.Tensor | None = None
        self._prev_rows: dict[RequestId, int] = {}
        self._last_end_event: Any = None
        self._timed = self.samples and dev.type == "cuda"
        self.runner.time_stages = self._timed and pp_size > 1
        self.profiler = StepProfiler.from_env(f"worker_tp{tp_rank}_pp{pp_rank}")

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)
        self.runner.capture_graphs()

    def apply_plan(self, plan: StepPlan) -> tuple[list[RequestState], list[int], dict[int, int]]:
        """Applies the diff; returns the batch's states, token counts and deferred inputs
        (state index -> row of the previous step's samples)."""
        if plan.expert_placements:
            self._apply_expert_placements(plan)
        release = self.runner.release_state
        for rid in plan.finished_ids:
            st = self.states.pop(rid, None)
            if st is not None:
                release(st)
        for new in plan.new_requests:
            old = self.states.get(new.req_id)
            if old is not None:
                release(old)
            self.states[new.req_id] = RequestState.from_new(new)
        deferred: set[RequestId] = set()
        for c in plan.cached_requests:
            st = self.states[c.req_id]
            st.block_ids.extend(c.new_block_ids)
            st.add_tokens(c.new_token_ids)
            if c.deferred:
                if st.num_pending or c.req_id not in self._prev_rows:
                    raise RuntimeError(f"worker out of sync on {c.req_id}: deferred input without a sample "
                                       "from the previous step")
                st.token_ids.append(-1)
                st.num_pending = 1
                deferred.add(c.req_id)
            if st.num_computed_tokens != c.num_computed_tokens:
                raise RuntimeError(f"worker out of sync on {c.req_id}: {st.num_computed_tokens} != {c.num_computed_tokens}")
        states = [self.states[rid] for rid in plan.num_scheduled_tokens]
        counts = list(plan.num_scheduled_tokens.values())
        fills = {i: self._prev_rows[st.req_id] for i, st in enumerate(states) if st.req_id in deferred}
        for st, n in zip(states, counts):
            if st.num_computed_tokens + n > len(st.token_ids):
                raise RuntimeError(f"worker out of sync on {st.req_id}: {n} tokens scheduled after "
                                   f"{st.num_computed_tokens}, but it holds {len(st.token_ids)}")
        return states, counts, fills

    def _apply_expert_placements(self, plan: StepPlan) -> None:
        """Collective over the TP group: every rank gets the same updates and moves weights in step."""
        from distrt.parallel.experts import ExpertPlacement

        model = self.runner.model
        mine = model.moe_layers()
        for u in plan.expert_placements:
            if u.layer in mine:
                layer = mine[u.layer]
                model.apply_expert_placement(u.layer, ExpertPlacement(layer.num_experts, self.ctx.ep_size,
                                                                      u.slot_to_expert, u.epoch))

    def _expert_load(self, plan: StepPlan) -> dict[int, tuple[int, ...]] | None:
        if not plan.collect_expert_load or not hasattr(self.runner.model, "take_expert_load"):
            return None
        return {i: tuple(int(c) for c in counts.tolist()) for i, counts in self.runner.model.take_expert_load().items()}

    def execute(self, plan: StepPlan) -> StepResult:
        return self.finish(self.launch(plan))

    def launch(self, plan: StepPlan) -> PendingStep:
        """Applies the plan and queues its device work without waiting for it; `finish` collects
        the tokens. Plans are launched in order; a deferred input reads the previous launch's samples."""
        t0 = time.perf_counter()
        states, counts, fills = self.apply_plan(plan)
        load = self._expert_load(plan)  # every rank clears its counts; the output rank reports them
        if not states:
            return PendingStep(plan.step_id, [], None, t0, load)
        if self.profiler is not None:
            t_prof = self.profiler.before()
        start = end = None
        if self._timed:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        launched = self.runner.launch(states, counts, self.link, self.samples, fills, self._prev_tokens, self.share)
        if self._timed:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            start = self.runner.received_event or start  # a later stage: idle until the activations arrive
        for st, n in zip(states, counts):
            st.num_computed_tokens += n
        self._prev_tokens = launched.tokens
        self._prev_rows = {states[row].req_id: j for j, row in enumerate(launched.rows)}
        if self.profiler is not None:
            self.profiler.after(t_prof)
        return PendingStep(plan.step_id, states, launched, t0, load, start, end)

    def finish(self, p: PendingStep) -> StepResult:
        """Waits for a launched step's tokens (output rank); other ranks get an empty result."""
        load = p.expert_load if self.samples else None
        if p.launched is None or not self.samples:
            return StepResult(p.step_id, expert_load=load)
        rows, out = self.runner.finish(p.launched)
        sampled: dict[RequestId, int] = {}
        logprobs: dict[RequestId, TokenLogprobs] = {}
        for row, tok, lp in zip(rows, out.token_ids, out.logprobs):
            st = p.states[row]
            sampled[st.req_id] = tok
            if lp is not None:
                logprobs[st.req_id] = TokenLogprobs(lp[0], tuple(lp[1]), tuple(lp[2]))
        idle = None
        if p.end_event is not None:
            p.end_event.synchronize()
            if self._last_end_event is not None:
                idle = max(0.0, self._last_end_event.elapsed_time(p.start_event)) / 1e3
            self._last_end_event = p.end_event
        return StepResult(p.step_id, sampled, logprobs, time.perf_counter() - p.t0, expert_load=load,
                          gpu_idle_s=idle)

    def shutdown(self) -> None:
        self.states.clear()
        self.runner.release()  # the CUDA graphs go first: they captured the TP all-reduce
        close = getattr(self.ctx.tp_comm, "close_fast_path", None)
        if close is not None:
            close()
