"""The RolloutWorker protocol every sampler implements, and the records it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch


@dataclass
class SamplingParams:
    """Sampling settings; names and meanings follow vLLM's SamplingParams one to one."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings; the matched string is kept in the text
    seed: int | None = None
    logprobs: bool = True
    # r1kit's own: the index of prompt 0 within a larger call split over processes, so its requests get the seeds
    # they would have had in that call (sample j of prompt i: request_seed(seed, first_index + i), ...)
    first_index: int = 0


@dataclass
class Completion:
    """One sampled response. `logprobs[i]` is the behaviour log-prob of `token_ids[i]` under
    softmax(logits / temperature), i.e. what the trainer recomputes, before any top-p/top-k truncation."""

    prompt_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (hit max_tokens)
    # routing replay (MoE): the experts each token of prompt + completion was routed to while sampling,
    # [len(prompt) + len(token_ids), MoE layers, K] int16, -1 where not recorded (the last sampled token, unless decoding fed it on)
    routed_experts: torch.Tensor | None = None


class RolloutWorker(Protocol):
    """A sampler the trainer drives. `generate` returns len(prompt_ids) * n completions, grouped by prompt
    (prompt-major: all n samples of prompt 0, then prompt 1, ...)."""

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...
