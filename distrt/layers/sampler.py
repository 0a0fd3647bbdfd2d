"""Turns a batch of logits into tokens: penalties, temperature, top-k/top-p/min-p, greedy or seeded
sampling, and log-probabilities. Everything runs on the logits' device; the only host sync is
the caller's read of the sampled ids.

Randomness is stateless: the noise for (seed, output index, token id) is a hash, so a request with a
given seed draws the same tokens whatever else is in the batch, after a preemption, and on any
executor. Sampling uses the exponential race: argmax(p / E), E ~ Exp(1), which draws from p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distrt.messages import SamplingSpec

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int64 tensors holding 32-bit values (products wrap; masked back)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def hashed_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N] seeds, [N] output indices -> [N, vocab] uniforms in (0, 1), a pure function of the inputs."""
    key = _fmix32(((seeds & _M32) * 0x9E3779B1 + steps) & _M32)  # [N]
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _fmix32((key[:, None] + tok[None, :] * 0x27D4EB2F) & _M32)  # [N, V]
    h = _fmix32(h ^ key[:, None])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplerRow:
    spec: SamplingSpec
    output_index: int  # how many tokens this request generated before this one
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: (sampled token's logprob, top ids, top logprobs) or None
    logprobs: list[tuple[float, list[int], list[float]] | None]


@dataclass
class DeviceSample:
    """A sampled batch still on the device. `start_copy` queues the device->host copies behind the
    sampling kernels (no sync); `to_host` waits for them and builds the SamplerOutput."""

    tokens: torch.Tensor  # int64 [N] on the logits' device
    want_lp: list[int | None]
    chosen: torch.Tensor | None = None  # [N] float32 logprob of the sampled token
    top_lp: torch.Tensor | None = None  # [N, k]
    top_ids: torch.Tensor | None = None  # [N, k]
    _host: tuple[torch.Tensor | None, ...] | None = None
    _event: object | None = None

    def start_copy(self) -> None:
        parts = (self.tokens, self.chosen, self.top_lp, self.top_ids)
        if self.tokens.device.type != "cuda":
            self._host = parts
            return
        self._host = tuple(None if t is None else _to_pinned(t) for t in parts)
        self._event = torch.cuda.Event()
        self._event.record()  # type: ignore[attr-defined]

    def ready(self) -> bool:
        return self._event is None or bool(self._event.query())  # type: ignore[attr-defined]

    def to_host(self) -> SamplerOutput:
        if self._host is None:
            self.start_copy()
        if self._event is not None:
            self._event.synchronize()  # type: ignore[attr-defined]
        tokens, chosen, top_lp, top_ids = self._host  # type: ignore[misc]
        token_list = tokens.tolist()  # type: ignore[union-attr]
        out_lp: list[tuple[float, list[int], list[float]] | None] = [None] * len(token_list)
        if chosen is not None:
            chosen_l = chosen.tolist()
            top_lp_l = top_lp.tolist() if top_lp is not None else None
            top_ids_l = top_ids.tolist() if top_ids is not None else None
            for i, k in enumerate(self.want_lp):
                if k is None:
                    continue
                ids = top_ids_l[i][:k] if top_ids_l else []
                lps = top_lp_l[i][:k] if top_lp_l else []
                out_lp[i] = (chosen_l[i], ids, lps)
        return SamplerOutput(token_list, out_lp)


def _on(dev: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[type-arg]
    """A host list on the device without a sync (a pageable copy would wait for the stream)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow]) -> SamplerOutput:
        return self.sample(logits, rows).to_host()

    def sample(self, logits: torch.Tensor, rows: list[SamplerRow]) -> DeviceSample:
        """Samples on the logits' device without a host sync (decisions are made from `rows`)."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        logits = logits.float()
        dev = logits.device
        # one pass over the rows for what the batch needs (hundreds of plain greedy rows is the common case)
        want_lp: list[int | None] = []
        any_lp = any_suppress = any_penalty = any_random = False
        for r in rows:
            s = r.spec
            want_lp.append(s.logprobs)
            any_lp = any_lp or s.logprobs is not None
            any_suppress = any_suppress or (bool(s.suppress_ids) and r.output_index < s.min_tokens)
            any_penalty = any_penalty or s.needs_penalties
            any_random = any_random or s.temperature > 0
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any_lp else None

        if any_suppress:
            logits = self._suppress(logits, rows)
        if any_penalty:
            logits = self._penalize(logits, rows)

        tokens = logits.argmax(dim=-1)
        if any_random:  # decided on the host: no device sync
            temps = _on(dev, [r.spec.temperature for r in rows], torch.float32)
            sampled = self._sample(logits, rows, temps)
            tokens = torch.where(temps == 0, tokens, sampled)
        out = DeviceSample(tokens, want_lp)
        if raw_logprobs is not None:
            kmax = max(k or 0 for k in want_lp)
            if kmax:
                out.top_lp, out.top_ids = raw_logprobs.topk(kmax, dim=-1)
            out.chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        return out

    @staticmethod
    def _suppress(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        for i, r in enumerate(rows):
            if r.spec.suppress_ids and r.output_index < r.spec.min_tokens:
                ids = [t for t in r.spec.suppress_ids if t < logits.shape[1]]
                logits[i, _on(logits.device, ids, torch.int64)] = float("-inf")
        return logits

    @staticmethod
    def _penalize(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        vocab = logits.shape[1]
        for i, r in enumerate(rows):
            s = r.spec
            if not s.needs_penalties:
                continue
            dev = logits.device
            out_ids = _on(dev, r.output_ids, torch.int64)
            counts = torch.zeros(vocab, device=dev, dtype=torch.float32)
            if len(r.output_ids):
                counts.scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
            row = logits[i]
            if s.repetition_penalty != 1.0:
                seen = counts > 0
                if r.prompt_ids:
                    seen[_on(dev, r.prompt_ids, torch.int64)] = True
                pen = torch.where(row > 0, row / s.repetition_penalty, row * s.repetition_penalty)
                row = torch.where(seen, pen, row)
            row = row - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).float()
            logits[i] = row
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[SamplerRow], temps: torch.Tensor) -> torch.Tensor:
        n, vocab = logits.shape
        dev = logits.device
        scaled = logits / torch.where(temps == 0, torch.ones_like(temps), temps)[:, None]
        sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [N, V]
        ranks = torch.arange(vocab, device=dev)[None, :]
        top_k = _on(dev, [r.spec.top_k if r.spec.top_k > 0 else vocab for r in rows], torch.int64)
        mask = ranks >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        top_p = _on(dev, [r.spec.top_p for r in rows], torch.float32)
        min_p = _on(dev, [r.spec.min_p for r in rows], torch.float32)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        mask = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        mask |= probs < (min_p[:, None] * probs[:, :1])
        mask[:, 0] = False
        probs = torch.softmax(sorted_logits.masked_fill(mask, float("-inf")), dim=-1)
        seeds = _on(dev, [r.spec.seed for r in rows], torch.int64)
        steps = _on(dev, [r.output_index for r in rows], torch.int64)
        noise = hashed_uniform(seeds, steps, vocab).gather(1, order)  # noise keyed by token id
        race = probs / (-torch.log(noise))
        choice = race.argmax(dim=-1, keepdim=True)
        return order.gather(1, choice).squeeze(1)
