"""Turning an API request into SamplingParams: defaults, the context-length check, and field errors."""

from __future__ import annotations

from distrt.engine.sampling_params import SamplingParams
from distrt.server.errors import APIError, from_value_error
from distrt.server.protocol import SamplingRequest

_GREEDY_EPS = 1e-5  # below this a temperature is greedy; dividing logits by it would overflow


def unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{param}: {what} is not supported by this server", param=param, code="unsupported_parameter")


def check_common(req: SamplingRequest) -> None:
    if req.logit_bias:
        raise unsupported("logit_bias", "a non-empty logit_bias")


def resolve_max_tokens(requested: int | None, explicit: bool, default: int | None, prompt_len: int,
                       max_model_len: int, param: str, prompt_param: str) -> int:
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your "
                            f"prompt has {prompt_len} tokens, which leaves no room for a completion.",
                       param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return room if explicit or default is None else min(default, room)
    if requested < 1:
        raise APIError(400, f"{param} must be an integer >= 1, got {requested}", param=param, code="invalid_value")
    if prompt_len + requested > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                            f"for the completion). Please reduce the prompt or {param}.",
                       param=param, code="context_length_exceeded")
    return requested


def build_sampling_params(req: SamplingRequest, *, max_tokens: int, logprobs: int | None, vocab_size: int,
                          renames: dict[str, str] | None = None) -> SamplingParams:
    temperature = 1.0 if req.temperature is None else req.temperature
    if 0.0 <= temperature < _GREEDY_EPS:
        temperature = 0.0
    top_k = -1 if req.top_k is None or req.top_k == 0 or req.top_k >= vocab_size else req.top_k
    stop_ids = list(req.stop_token_ids or [])
    for t in stop_ids:
        if not 0 <= t < vocab_size:
            raise APIError(400, f"stop_token_ids: {t} is outside the vocabulary [0, {vocab_size})",
                           param="stop_token_ids", code="invalid_value")
    try:
        return SamplingParams(
            n=req.n, temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p, top_k=top_k,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
            stop_token_ids=stop_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens)
    except ValueError as e:
        raise from_value_error(e, renames=renames) from None
