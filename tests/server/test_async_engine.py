"""AsyncLLMEngine on its own: same tokens as LLM.generate, early exit aborts, shutdown fails what is in flight."""

from __future__ import annotations

import asyncio
import time

import pytest

from distrt import LLM, SamplingParams
from distrt.engine.async_engine import AsyncLLMEngine
from distrt.executor.base import EngineDeadError


@pytest.fixture()
def llm(tiny_model: str) -> LLM:
    return LLM(tiny_model, dtype="float32", device="cpu", max_model_len=128, num_kv_blocks=64, block_size=8)


async def _idle(engine: AsyncLLMEngine) -> None:
    def check(e: object) -> int:
        e.check_integrity()  # type: ignore[attr-defined]
        return e.num_unfinished_requests + e.allocator.num_blocks - e.allocator.num_free_blocks  # type: ignore

    for _ in range(200):
        if await engine.run_in_engine(check) == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("engine not idle")


def test_generate_abort_and_shutdown(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    ref = llm.generate(["w5 w6 w7", "w9"], params, use_tqdm=False)
    engine = AsyncLLMEngine.from_llm(llm)

    async def collect(prompt: str, rid: str) -> list[int]:
        last = None
        async for out in engine.generate(prompt, params, rid):
            assert last is None or len(out.outputs[0].token_ids) > len(last.outputs[0].token_ids)
            last = out
        assert last is not None and last.finished
        return last.outputs[0].token_ids

    async def scenario() -> None:
        got = await asyncio.gather(collect("w5 w6 w7", "a"), collect("w9", "b"))
        assert got == [r.outputs[0].token_ids for r in ref]
        long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        gen = engine.generate("w5", long, "c")
        first = await gen.__anext__()
        assert not first.finished
        await gen.aclose()  # leaving early aborts
        await _idle(engine)
        bad = SamplingParams()
        bad.top_p = 5.0  # caught by the engine thread's add_request, delivered to the caller
        with pytest.raises(ValueError, match="top_p"):
            async for _ in engine.generate("w5", bad, "bad"):
                pass
        pending = engine.generate("w5", long, "d")
        await pending.__anext__()
        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in pending:
                pass
        assert time.monotonic() - t0 < 5
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("w5", long, "e"):
                pass

    asyncio.run(scenario())
