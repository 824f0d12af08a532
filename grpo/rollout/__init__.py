"""Rollout workers: the RolloutWorker protocol, the native torch sampler, the vLLM worker and the server client."""

from grpo.rollout.base import Completion, RolloutWorker, SamplingParams  # noqa: F401


def make_worker(kind: str, model, tokenizer, model_path: str, **kwargs) -> RolloutWorker:
    """The trainer's sampler: `native` shares the live model; `vllm` runs an engine on the checkpoint at
    `model_path` and receives new weights through update_weights after every optimizer step; `server` is the
    client of an `r1 serve` process (kwargs `server`: its VLLMServerConfig; `world`, `rank`: torchrun's)."""
    server, world, rank = kwargs.pop("server", None), kwargs.pop("world", 1), kwargs.pop("rank", 0)
    sampler_dtype = kwargs.pop("sampler_dtype", None)  # the native sampler's own weight copy (runtime.sampler_dtype)
    if kind == "native":
        from grpo.rollout.native import NativeWorker

        return NativeWorker(model, tokenizer, record_routing=kwargs.get("record_routing", False),
                            dtype=sampler_dtype)
    if kind == "vllm":
        from grpo.rollout.vllm import VLLMWorker

        if kwargs.pop("record_routing", False):
            raise ValueError("routing_replay needs rollout: native (the vLLM worker does not return routed experts)")
        kwargs.setdefault("max_model_len", min(2048, getattr(model.config, "max_position_embeddings", 2048)))
        return VLLMWorker(model_path, **kwargs)
    if kind == "server":
        from grpo.rollout.server import connect

        if kwargs.pop("record_routing", False):
            raise ValueError("routing_replay needs rollout: native (the vLLM server does not return routed experts)")
        return connect(server, world, rank)
    raise ValueError(f"unknown rollout {kind!r} (native, vllm or server)")
