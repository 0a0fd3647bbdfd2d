"""distrt: a distributed LLM inference runtime."""

from distrt.engine.outputs import CompletionOutput, RequestOutput
from distrt.engine.sampling_params import SamplingParams
from distrt.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
