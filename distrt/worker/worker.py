"""A worker: one model shard (its TP slice of its pipeline stage's layers), its slice of the KV
pool, and the per-request state it needs to execute StepPlans. One per GPU (or per CPU rank in tests).

Token ids come only from the plans (messages.py): a worker appends the `new_token_ids` the
coordinator sends, never its own samples, so every stage and TP rank holds the same tokens.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from distrt.config import EngineConfig
from distrt.messages import RequestId, StepPlan, StepResult, TokenLogprobs
from distrt.models.shard import ShardContext
from distrt.worker.model_runner import ModelRunner, resolve_dtype
from distrt.worker.pipeline import StageLink
from distrt.worker.request_state import RequestState


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

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)
        self.runner.capture_graphs()

    def apply_plan(self, plan: StepPlan) -> tuple[list[RequestState], list[int]]:
        if plan.expert_placements:
            self._apply_expert_placements(plan)
        for rid in plan.finished_ids:
            self.states.pop(rid, None)
        for new in plan.new_requests:
            self.states[new.req_id] = RequestState.from_new(new)
        for c in plan.cached_requests:
            st = self.states[c.req_id]
            st.block_ids.extend(c.new_block_ids)
            st.token_ids.extend(c.new_token_ids)
            if st.num_computed_tokens != c.num_computed_tokens:
                raise RuntimeError(f"worker out of sync on {c.req_id}: {st.num_computed_tokens} != {c.num_computed_tokens}")
        states = [self.states[rid] for rid in plan.num_scheduled_tokens]
        counts = list(plan.num_scheduled_tokens.values())
        for st, n in zip(states, counts):
            if st.num_computed_tokens + n > len(st.token_ids):
                raise RuntimeError(f"worker out of sync on {st.req_id}: {n} tokens scheduled after "
                                   f"{st.num_computed_tokens}, but it holds {len(st.token_ids)}")
        return states, counts

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
        t0 = time.perf_counter()
        states, counts = self.apply_plan(plan)
        if not states:
            return StepResult(plan.step_id, expert_load=self._expert_load(plan) if self.samples else None)
        rows, out = self.runner.execute(states, counts, self.link, self.samples)
        for st, n in zip(states, counts):
            st.num_computed_tokens += n
        sampled: dict[RequestId, int] = {}
        logprobs: dict[RequestId, TokenLogprobs] = {}
        for row, tok, lp in zip(rows, out.token_ids, out.logprobs):
            st = states[row]
            sampled[st.req_id] = tok
            if lp is not None:
                logprobs[st.req_id] = TokenLogprobs(lp[0], tuple(lp[1]), tuple(lp[2]))
        load = self._expert_load(plan)  # every rank clears its counts; the output rank reports them
        return StepResult(plan.step_id, sampled, logprobs, time.perf_counter() - t0,
                          expert_load=load if self.samples else None)

    def shutdown(self) -> None:
        self.states.clear()
        self.runner.release()
