"""Hugging Face transformers baselines for the offline benchmarks, on the weights distrt ran.

A random-weight shape (`--shape`) gets the same weights in both: distrt loads the shape's virtual
checkpoint by tensor name (models/shapes.py) and `fill_random_` gives the transformers model the
value of each of its tensors by the same name, seed, dtype and device. A checkpoint directory is
loaded by transformers itself.

Both baselines take a wall-clock cap (and a deadline that cuts it): `generate` stops after the padded
batch that crosses it, `generate_batch` (continuous batching, driven through its manager, streamed
when capped so that tokens of unfinished requests count) stops at it. Results are output tokens per
second over what ran, with how much ran; a capped continuous-batching run also reports its rate
after every request had its first token (`decode_phase_tok_s`), the part a cap cuts short.
"""

from __future__ import annotations

import gc
import time
from typing import Any


def hf_model(raw_cfg: dict[str, Any], model: str | None, shape: str | None) -> Any:
    """A transformers model on this process's accelerator (bf16) or CPU (fp32), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from distrt.models.shapes import fill_random_, hf_config

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if shape:
        with torch.device(dev):
            m = AutoModelForCausalLM.from_config(hf_config(raw_cfg), dtype=dtype)
        fill_random_(m)
    elif model and not model.endswith(".gguf") and model != "default":
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(dev)
    else:
        raise ValueError(f"no transformers baseline for {model!r}: give --shape or a checkpoint directory")
    return m.eval()


def lingering_threads() -> list[Any]:
    """Non-daemon threads still alive (a baseline's generation loop that did not stop keeps the process up)."""
    import threading

    return [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]


def release(model: Any) -> None:
    del model
    gc.collect()
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cap(time_cap_s: float, deadline: float | None) -> float:
    """Seconds the timed part may run: the cap, cut to what is left before `deadline` (perf_counter)."""
    cap = time_cap_s if time_cap_s > 0 else float("inf")
    if deadline is not None:
        cap = min(cap, deadline - time.perf_counter())
    return cap


def hf_generate(model: Any, prompts: list[list[int]], out_lens: list[int], batch: int,
                time_cap_s: float = 0.0, deadline: float | None = None) -> dict[str, Any] | None:
    """`generate` over left-padded static batches, every row run to its batch's longest output.
    None when no time is left before `deadline`."""
    import torch

    cap = _cap(time_cap_s, deadline)
    if cap < 5:
        return None
    dev = next(model.parameters()).device
    total = done = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        if time.perf_counter() - t0 >= cap:
            break
        chunk = prompts[i: i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=dev)
        n = max(out_lens[i: i + batch])
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        total += n * len(chunk)
        done += len(chunk)
    _sync()
    dt = time.perf_counter() - t0
    return {"output_tok_s": total / dt, "seconds": dt, "requests": done, "output_tokens": total,
            "capped": done < len(prompts)}


def hf_generate_batch(model: Any, prompts: list[list[int]], out_lens: list[int],
                      time_cap_s: float = 0.0, deadline: float | None = None) -> dict[str, Any] | None:
    """transformers' continuous batching on `prompts` (all submitted at once, EOS off). Its CUDA-graph
    warm-up runs before the clock starts, as distrt's does. Returns tok/s and, per prompt, the
    tokens it generated (for the first-token agreement check); None when no time is left."""
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max(out_lens), do_sample=False, eos_token_id=-1, pad_token_id=0)
    try:
        return _cb_manager(model, gen, prompts, out_lens, time_cap_s, deadline)
    except (AttributeError, TypeError) as e:  # an API this transformers version lacks: the one-call form
        print(f"transformers continuous-batching manager unusable ({e!r}); falling back to generate_batch, uncapped",
              flush=True)
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=gen)
    _sync()
    dt = time.perf_counter() - t0
    tokens = [list(o.generated_tokens) for o in out.values()]
    total = sum(map(len, tokens))
    return {"output_tok_s": total / dt, "seconds": dt, "requests": len(prompts), "finished": len(out),
            "output_tokens": total, "capped": False, "streaming": False, "tokens": tokens}


def _cb_manager(model: Any, gen: Any, prompts: list[list[int]], out_lens: list[int], time_cap_s: float,
                deadline: float | None) -> dict[str, Any] | None:
    try:  # the sizing hints generate_batch itself passes, where this version has them
        from transformers.generation.continuous_batching.utils import WorkloadHints

        hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(out_lens),
                              num_requests=len(prompts))
        mgr = model.init_continuous_batching(generation_config=gen, workload_hints=hints)
    except (ImportError, TypeError):
        mgr = model.init_continuous_batching(generation_config=gen)
    t_warm = time.perf_counter()
    cuda = next(model.parameters()).device.type == "cuda"  # the warm-up captures CUDA graphs; nothing to do on CPU
    if cuda and callable(getattr(mgr, "warmup", None)) and not getattr(mgr, "warmed_up", False):
        mgr.warmup()
    warmup_s = time.perf_counter() - t_warm
    cap = _cap(time_cap_s, deadline)
    if cap < 5:
        if callable(getattr(mgr, "destroy", None)):
            mgr.destroy()
        return None
    streaming = cap != float("inf")  # partial outputs are only visible streamed; uncapped it is generate_batch's loop
    mgr.start()
    rid_to_idx: dict[str, int] = {}
    got: dict[str, list[int]] = {}
    finished: set[str] = set()
    capped = False
    try:
        t0 = time.perf_counter()
        for i, (ids, n) in enumerate(zip(prompts, out_lens)):  # add_request: the same signature in 5.x so far
            rid_to_idx[mgr.add_request(ids, request_id=f"bench_{i}", max_new_tokens=n, streaming=streaming,
                                       eos_token_id=-1)] = i
        stop_at = t0 + cap
        all_started_at = None  # when every request had its first token: the decode phase starts
        tokens_then = 0
        while len(finished) < len(rid_to_idx):
            now = time.perf_counter()
            if now >= stop_at:
                capped = True
                break
            r = mgr.get_result(timeout=min(1.0, stop_at - now))
            if r is None:
                if not mgr.is_running():
                    raise RuntimeError("transformers' continuous-batching thread stopped early")
                continue
            if getattr(r, "error", None):
                raise RuntimeError(f"transformers continuous batching failed a request: {r.error}")
            got[r.request_id] = r.generated_tokens
            if r.is_finished():
                finished.add(r.request_id)
            if all_started_at is None and streaming and len(got) == len(rid_to_idx) and all(got.values()):
                all_started_at, tokens_then = time.perf_counter(), sum(map(len, got.values()))
        _sync()
        t_end = time.perf_counter()
        dt = t_end - t0
    finally:
        if capped and callable(getattr(mgr, "cancel_request", None)):
            for rid in rid_to_idx:
                if rid not in finished:
                    mgr.cancel_request(rid)
        try:
            mgr.stop(block=True, timeout=20, hard_stop=True)
        except TypeError:  # no hard_stop in this version: the loop ends once the cancelled requests are dropped
            mgr.stop(block=True, timeout=20)
        if callable(getattr(mgr, "destroy", None)):
            mgr.destroy()
        if mgr.is_running():
            print("!! transformers' generation thread is still running after stop()", flush=True)
    tokens: list[list[int]] = [[] for _ in prompts]
    for rid, toks in got.items():
        tokens[rid_to_idx[rid]] = list(toks)
    total = sum(map(len, tokens))
    decode = (total - tokens_then) / (t_end - all_started_at) if all_started_at and t_end > all_started_at else None
    return {"output_tok_s": total / dt, "seconds": dt, "requests": len(prompts), "finished": len(finished),
            "output_tokens": total, "capped": capped, "streaming": streaming, "warmup_s": warmup_s,
            "decode_phase_tok_s": decode, "tokens": tokens}
