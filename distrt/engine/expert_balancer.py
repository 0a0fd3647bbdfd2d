"""Coordinator-owned MoE expert placement: one ExpertPlacement per MoE layer, fed by the load the
workers report every `interval` steps, rebalanced at a step boundary.

    step k:    plan.collect_expert_load = True  ->  result.expert_load = {layer: tokens per expert}
    step k+1:  plan.expert_placements = (PlacementUpdate(layer, epoch, slot_to_expert), ...)
               every TP rank moves expert weights to the new slots before that step's forward

A rebalance changes where experts live, never what they compute: outputs are unchanged.
"""

from __future__ import annotations

import dataclasses

from distrt.config import EngineConfig
from distrt.messages import PlacementUpdate, StepPlan, StepResult
from distrt.parallel.experts import ExpertPlacement, moe_layers_of, num_experts_of


class ExpertBalancer:
    def __init__(self, config: EngineConfig) -> None:
        p = config.parallel
        hf = config.model.hf_config
        experts = num_experts_of(hf)
        self.interval = p.expert_rebalance_interval if experts and p.pipeline_parallel_size == 1 else 0
        self.placements = {i: ExpertPlacement.initial(experts, p.expert_parallel_size, p.num_redundant_experts)
                           for i in moe_layers_of(hf, config.model.num_layers)} if experts else {}
        self._pending: list[PlacementUpdate] = []
        self._steps = 0
        self.num_rebalances = 0

    @property
    def active(self) -> bool:
        return self.interval > 0 and bool(self.placements)

    def decorate(self, plan: StepPlan) -> StepPlan:
        """Adds pending placement updates and, every `interval` steps, asks for the expert load."""
        if not self.active or plan.is_empty:
            return plan
        self._steps += 1
        collect = self._steps % self.interval == 0
        updates, self._pending = tuple(self._pending), []
        if not updates and not collect:
            return plan
        return dataclasses.replace(plan, expert_placements=updates, collect_expert_load=collect)

    def observe(self, result: StepResult) -> None:
        if not self.active or not result.expert_load:
            return
        for layer, counts in result.expert_load.items():
            current = self.placements.get(layer)
            if current is None:
                continue
            current.record_load(counts)
            new = current.rebalance()  # epoch + 1, load cleared; the table changes only if it pays
            self.placements[layer] = new
            if new.slot_to_expert != current.slot_to_expert:
                self._pending.append(PlacementUpdate(layer, new.epoch, tuple(new.slot_to_expert)))
                self.num_rebalances += 1
