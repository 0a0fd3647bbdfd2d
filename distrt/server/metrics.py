"""The server's metrics: engine gauges read from its stats snapshot, and per-request latency histograms."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from distrt.engine.async_engine import AsyncLLMEngine, EngineStats
from distrt.engine.outputs import RequestOutput
from distrt.server.prometheus import Counter, Gauge, Histogram, Registry

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, in_flight: Callable[[], int]) -> None:
        reg = self.registry = Registry({"model_name": model_name})

        def stat(read: Callable[[EngineStats], float]) -> Callable[[], float]:
            return lambda: read(engine.stats)

        reg.add(Gauge("distrt_num_requests_running", "Sequences running in the engine (in the batch).",
                      stat(lambda s: s.num_running)))
        reg.add(Gauge("distrt_num_requests_waiting", "Sequences waiting to be scheduled.",
                      stat(lambda s: s.num_waiting)))
        reg.add(Gauge("distrt_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0 to 1).",
                      stat(lambda s: s.kv_usage)))
        reg.add(Gauge("distrt_kv_cache_free_blocks", "KV-cache blocks free.", stat(lambda s: s.num_free_blocks)))
        reg.add(Gauge("distrt_kv_cache_total_blocks", "KV-cache blocks in the pool.", stat(lambda s: s.num_blocks)))
        reg.add(Gauge("distrt_http_requests_in_flight", "Generation requests being served over HTTP.",
                      lambda: float(in_flight())))
        reg.add(Gauge("distrt_engine_healthy", "1 while the engine serves requests, 0 once it died.",
                      lambda: 0.0 if engine.is_dead else 1.0))
        reg.add(Counter("distrt_num_preemptions_total", "Sequences preempted (KV freed, recomputed later).",
                        stat(lambda s: s.num_preemptions)))
        reg.add(Counter("distrt_prompt_tokens_total", "Prompt tokens prefilled.", stat(lambda s: s.prompt_tokens)))
        reg.add(Counter("distrt_generation_tokens_total", "Tokens generated.", stat(lambda s: s.generation_tokens)))
        self.requests_success = reg.add(Counter("distrt_request_success_total", "Requests that finished normally."))
        self.requests_failed = reg.add(Counter("distrt_request_failure_total",
                                               "Requests that ended with an engine error."))
        self.requests_aborted = reg.add(Counter("distrt_request_aborted_total",
                                                "Requests aborted before finishing (client gone or shutdown)."))
        self.ttft = reg.add(Histogram("distrt_time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS))
        self.itl = reg.add(Histogram("distrt_inter_token_latency_seconds", "Time between output tokens.",
                                     _LATENCY_BUCKETS))
        self.e2e = reg.add(Histogram("distrt_e2e_request_latency_seconds", "Request latency, arrival to finish.",
                                     _E2E_BUCKETS))

    def render(self) -> str:
        return self.registry.render()

    async def track(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Passes outputs through, timing the first token, the gaps between tokens, and the whole request."""
        start = time.monotonic()
        last = start
        seen = 0
        finished = failed = False
        try:
            async for out in outputs:
                now = time.monotonic()
                ntok = max((len(o.token_ids) for o in out.outputs), default=0)
                if ntok > seen:
                    if seen == 0:
                        self.ttft.observe(now - start)
                    else:
                        self.itl.observe((now - last) / (ntok - seen), ntok - seen)
                    seen, last = ntok, now
                finished = out.finished
                yield out
        except Exception:
            failed = True
            raise
        finally:
            if finished:
                self.requests_success.inc()
                self.e2e.observe(time.monotonic() - start)
            elif failed:
                self.requests_failed.inc()
            else:
                self.requests_aborted.inc()
