"""Rollout workers: the RolloutWorker protocol, the native torch sampler and the vLLM worker."""

from grpo.rollout.base import Completion, RolloutWorker, SamplingParams  # noqa: F401
