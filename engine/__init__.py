"""Minimal paged serving engine on pallaskit kernels: `from engine import LLM, SamplingParams`."""

from engine.config import CheckpointError
from engine.llm import LLM, EmbeddingOutput, RequestOutput, StepOutput
from engine.pooling import PoolingParams
from engine.sampler import SamplingParams

__all__ = ["LLM", "CheckpointError", "EmbeddingOutput", "PoolingParams", "RequestOutput", "SamplingParams",
           "StepOutput"]
