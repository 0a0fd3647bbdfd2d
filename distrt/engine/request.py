"""Coordinator-side request state, counted in tokens (not phases)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from distrt.engine.sampling_params import SamplingParams
from distrt.messages import RequestId, TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: RequestId
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    detok: Any = None  # IncrementalDetokenizer, set by the engine
    output_text: str = ""
    parent_id: str | None = None  # the user-visible request when n > 1
    index: int = 0  # which of the n samples

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def check_token_stop(self, token: int) -> bool:
        """Token-level stop conditions, after `token` was appended; sets finish_reason."""
        n_out = len(self.output_token_ids)
        if n_out >= self.params.min_tokens:
            if not self.params.ignore_eos and token in self.eos_token_ids:
                self.finish_reason = "stop"
                return True
            if token in (self.params.stop_token_ids or ()):
                self.finish_reason, self.stop_reason = "stop", token
                return True
        if self.params.max_tokens is not None and n_out >= self.params.max_tokens:
            self.finish_reason = "length"
            return True
        if self.num_tokens >= self.max_model_len:
            self.finish_reason = "length"
            return True
        return False
