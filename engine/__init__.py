"""Minimal paged serving engine on pallaskit kernels: `from engine import LLM, SamplingParams`."""

from engine.config import CheckpointError
from engine.llm import LLM, RequestOutput, StepOutput
from engine.sampler import SamplingParams

__all__ = ["LLM", "CheckpointError", "RequestOutput", "SamplingParams", "StepOutput"]
