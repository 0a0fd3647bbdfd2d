"""distrt: a distributed LLM inference runtime."""

from distrt.engine.outputs import CompletionOutput, RequestOutput
from distrt.engine.sampling_params import SamplingParams
from distrt.executor.base import EngineDeadError
from distrt.executor.cluster import Cluster
from distrt.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Cluster", "EngineDeadError"]
__version__ = "0.1.0"
