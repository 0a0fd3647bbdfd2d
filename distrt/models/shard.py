"""What a model needs to know to build its shard: dtype, device, its TP rank and PP stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ShardContext:
    dtype: torch.dtype
    device: torch.device
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_comm: Any = None  # distrt.parallel.comm.Communicator when tp_size > 1
    pp_comm: Any = None  # when pp_size > 1
    layer_split: tuple[int, ...] | None = None  # layers per stage; None = even
    ep_size: int = 1  # MoE experts split over ep ranks inside the TP group (see parallel/state.py)
    num_redundant_experts: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        split = self.layer_split or even_layer_split(num_layers, self.pp_size)
        if len(split) != self.pp_size or sum(split) != num_layers or min(split) < 1:
            raise ValueError(f"layer split {split} does not give {self.pp_size} stages of >= 1 layer summing to {num_layers}")
        start = sum(split[: self.pp_rank])
        return start, start + split[self.pp_rank]


def even_layer_split(num_layers: int, pp_size: int) -> tuple[int, ...]:
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size ({pp_size}) exceeds the number of layers ({num_layers})")
    base, extra = divmod(num_layers, pp_size)
    return tuple(base + (1 if i < extra else 0) for i in range(pp_size))
