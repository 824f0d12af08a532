"""DeepSeek-V3-style language model in one file: MLA attention, DeepSeekMoE, multi-token prediction.

Trainable (full-sequence logits; main and MTP losses from hidden states through fused_logprob, no [N,V] logits
in them; gradient checkpointing, aux-loss-free bias update) and checkpoint-compatible: `save_pretrained` writes
an HF directory that transformers' DeepseekV3ForCausalLM and vLLM load; `from_pretrained` reads HF
DeepSeek-V2/V3 checkpoints (per-expert keys, fp32 router bias).

Simplifications against the DeepSeek-V3 paper/reference: no FP8, no tensor/expert parallelism, bf16/fp32 only;
the MTP modules share the main embedding and output head while training (they are copied out on save).

Shape letters: B batch, S new tokens, T past+new tokens, H heads, D model width, C kv_lora_rank,
Q q_lora_rank, n qk_nope_head_dim, r qk_rope_head_dim, v v_head_dim, E routed experts, K experts per token,
I moe_intermediate_size, N tokens (B*S flattened).
"""

import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from grpo.kernels.logprob import fused_logprob  # log-probs from hidden states, streamed over vocab chunks
from grpo.kernels.moe import moe_ffn  # routed experts on expert-sorted rows: Triton on CUDA, torch elsewhere
from grpo.kernels.rmsnorm import rms_norm  # fp32-statistics RMSNorm: Triton on CUDA, torch elsewhere


# ----------------------------------------------------------------------------------------------- config
@dataclass
class DeepseekConfig:
    """The keys of HF's DeepseekV3Config (defaults: the real DeepSeek-V3), plus what vLLM and training need."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    output_router_logits: bool = False
    num_nextn_predict_layers: int = 0  # MTP depth D (HF alias: num_mtp_layers)
    # vLLM reads these two; HF's config class drops them, so they must be written explicitly.
    topk_method: str = "noaux_tc"  # noaux_tc (V3: bias + group top-2 sum) | group_limited_greedy (V2) | greedy
    scoring_func: str = "sigmoid"  # sigmoid (V3) | softmax (V2)
    # r1kit training knobs; transformers and vLLM ignore them.
    bias_update_speed: float = 0.001  # gamma of the aux-loss-free bias update
    aux_loss_alpha: float = 0.0  # alpha of the sequence-wise balance loss (0 = off)
    mtp_loss_weight: float = 0.3  # lambda of the MTP loss

    @classmethod
    def from_dict(cls, d: dict) -> "DeepseekConfig":
        """Build from an HF config.json dict: legacy rope_theta/rope_scaling keys, aliases, unknown keys dropped."""
        d = dict(d)
        if "rope_parameters" not in d or not d["rope_parameters"]:
            rope = dict(d.get("rope_scaling") or {"rope_type": "default"})
            rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
            rope["rope_theta"] = d.get("rope_theta", 10000.0)
            d["rope_parameters"] = rope
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if d.get("model_type") == "deepseek_v2":  # V2 defaults differ from V3's where the JSON omits them
            d.setdefault("topk_method", "greedy")
            d.setdefault("scoring_func", "softmax")
            d.setdefault("n_group", 1)
            d.setdefault("topk_group", 1)
        if d.get("n_group") is None:
            d["n_group"], d["topk_group"] = 1, 1
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """As transformers' PretrainedConfig.to_dict (callers that log or copy a model's config)."""
        return self.to_hf_dict()

    def to_hf_dict(self) -> dict:
        """config.json for transformers (model_type deepseek_v3) and vLLM (topk_method, scoring_func)."""
        d = dataclasses.asdict(self)
        d["rope_parameters"] = dict(self.rope_parameters)
        return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **d}


# ----------------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


# ----------------------------------------------------------------------------------------------- rope
def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature correction 0.1*m*ln(s)+1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg: DeepseekConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [r/2] of the rope dims and the cos/sin scale; YaRN blends interpolated and
    extrapolated frequencies over a linear ramp between the beta_fast and beta_slow correction dims."""
    p, dim = cfg.rope_parameters, cfg.qk_rope_head_dim
    base = p.get("rope_theta", 10000.0)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if p.get("rope_type", "default") == "default":
        return inv_freq, 1.0
    assert p["rope_type"] in ("yarn", "deepseek_yarn"), p["rope_type"]
    orig = p.get("original_max_position_embeddings", cfg.max_position_embeddings)
    factor = p.get("factor") or cfg.max_position_embeddings / orig
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        attn_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else yarn_mscale(factor)
    return inv_freq, attn_factor


def softmax_scale(cfg: DeepseekConfig) -> float:
    """1/sqrt(n+r), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's long-context temperature)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    p = cfg.rope_parameters
    if p.get("rope_type", "default") != "default" and p.get("mscale_all_dim"):
        scale = scale * yarn_mscale(p["factor"], p["mscale_all_dim"]) ** 2
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3).. of the last dim; x [B,S,...,r], cos/sin [B,S,r/2].
    The output lists the rotated even slots then the odd ones (as transformers 5.19 does): a fixed permutation
    of DeepSeek's complex-number layout, applied to q and k alike, so q.k is unchanged."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ----------------------------------------------------------------------------------------------- cache
class MLACache:
    """Per-layer KV cache of MLA: only the normalised latent [B,T,C] and the roped shared key [B,T,r] per token,
    written into buffers that double when full (no O(T) copy of the whole cache on every decoding step).
    Same interface the sampler uses on transformers' DynamicCache."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity  # tokens to reserve per layer on the first update (e.g. prompt + max new tokens)
        self.latent: list[torch.Tensor] = []  # per layer [B, capacity, C]
        self.k_pe: list[torch.Tensor] = []  # per layer [B, capacity, r]
        self.length: list[int] = []  # per layer tokens cached

    def update(self, layer: int, c: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's [B,S,C] and [B,S,r] to layer `layer`; return views of all T tokens so far."""
        if layer == len(self.latent):
            S = c.shape[1]
            self.latent.append(c if self.capacity <= S else _grown(c, S, self.capacity))
            self.k_pe.append(k_pe if self.capacity <= S else _grown(k_pe, S, self.capacity))
            self.length.append(S)
            return c, k_pe
        start, end = self.length[layer], self.length[layer] + c.shape[1]
        if end > self.latent[layer].shape[1]:  # grow to twice the need: amortised O(1) copies per token
            self.latent[layer] = _grown(self.latent[layer], start, 2 * end)
            self.k_pe[layer] = _grown(self.k_pe[layer], start, 2 * end)
        self.latent[layer][:, start:end] = c
        self.k_pe[layer][:, start:end] = k_pe
        self.length[layer] = end
        return self.latent[layer][:, :end], self.k_pe[layer][:, :end]

    def get_seq_length(self, layer: int = 0) -> int:
        """Tokens cached so far (padding included)."""
        return self.length[layer] if layer < len(self.length) else 0

    def batch_select_indices(self, idx: torch.Tensor):
        """Keep only rows `idx` (drop finished sequences), in place."""
        self.latent = [t[idx] for t in self.latent]
        self.k_pe = [t[idx] for t in self.k_pe]

    def bytes_per_token(self) -> int:
        """Cache bytes per token summed over layers."""
        return sum(c.shape[-1] * c.element_size() + k.shape[-1] * k.element_size()
                   for c, k in zip(self.latent, self.k_pe))


def _grown(buf: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    """A [B, capacity, X] buffer holding buf's first `used` tokens."""
    out = buf.new_empty(buf.shape[0], capacity, buf.shape[2])
    out[:, :used] = buf[:, :used]
    return out


# ----------------------------------------------------------------------------------------------- attention
class MLA(nn.Module):
    """Multi-head latent attention: low-rank q, a shared kv latent C plus one decoupled rope key per token.
    `mode` picks the path: 'expanded' (k/v per head from the latent; training, prefill), 'absorbed' (kv_b folded
    into q and the output, attention in latent space; decode), 'auto' (absorbed when decoding with a cache)."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg
        H, D, C, n, r, v = (cfg.num_attention_heads, cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                            cfg.qk_rope_head_dim, cfg.v_head_dim)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * (n + r), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 as in HF and DeepSeek's code
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (n + r), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, C + r, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(C)
        self.kv_b_proj = nn.Linear(C, H * (n + v), bias=False)
        self.o_proj = nn.Linear(H * v, D, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg)
        self.mode = "auto"

    def forward(self, x, cos, sin, mask, cache: MLACache | None, layer: int):
        """x [B,S,D], cos/sin [B,S,r/2], mask [B,S,T] bool (True = may attend) -> [B,S,D]."""
        cfg = self.cfg
        B, S, _ = x.shape
        H, C, n, r, v = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.v_head_dim)
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, S, H, n + r).split([n, r], dim=-1)  # [B,S,H,n], [B,S,H,r]
        c, k_pe = self.kv_a_proj_with_mqa(x).split([C, r], dim=-1)  # [B,S,C], [B,S,r]
        c = self.kv_a_layernorm(c)
        q_pe, k_pe = apply_rope(q_pe, cos, sin), apply_rope(k_pe, cos, sin)
        past = 0
        if cache is not None:
            past = cache.get_seq_length(layer)
            c, k_pe = cache.update(layer, c, k_pe)  # [B,T,C], [B,T,r]
        absorbed = self.mode == "absorbed" or (self.mode == "auto" and past > 0 and not self.training)
        w_kv_b = self.kv_b_proj.weight.view(H, n + v, C)
        if absorbed:
            q_lat = torch.einsum("bshn,hnc->bshc", q_nope, w_kv_b[:, :n])  # W_UK folded into the query
            scores = torch.einsum("bshc,btc->bsht", q_lat, c) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
        else:
            k_nope, value = self.kv_b_proj(c).view(B, -1, H, n + v).split([n, v], dim=-1)  # [B,T,H,n], [B,T,H,v]
            scores = torch.einsum("bshn,bthn->bsht", q_nope, k_nope) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
        scores = scores * self.scale
        scores = scores.masked_fill(~mask[:, :, None, :], torch.finfo(scores.dtype).min)
        # at least fp32 (bf16 scores), float64 kept: a float64 min cast to fp32 is -inf, and a fully masked row NaN
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(x.dtype)  # [B,S,H,T]
        if absorbed:
            o_lat = torch.einsum("bsht,btc->bshc", probs, c)
            out = torch.einsum("bshc,hvc->bshv", o_lat, w_kv_b[:, n:])  # W_UV applied after attention
        else:
            out = torch.einsum("bsht,bthv->bshv", probs, value)
        return self.o_proj(out.reshape(B, S, H * v))


# ----------------------------------------------------------------------------------------------- MoE
class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and the shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: DeepseekConfig):
    """Pick K experts per token. x [N,D] -> topk_ids [N,K] int64, topk_weights [N,K] fp32, scores [N,E] fp32.
    As transformers 5.19: router in fp32; the correction bias only changes *which* experts are chosen;
    groups ranked by the sum of their top-2 (noaux_tc) or their max (V2), masked groups set to -inf;
    weights are the unbiased scores, normalised (+1e-20) and scaled by routed_scaling_factor."""
    N, E, G = x.shape[0], cfg.n_routed_experts, cfg.n_group
    logits = F.linear(x.float(), weight.float())  # [N,E]
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()
    if G > 1 and cfg.topk_method != "greedy":
        grouped = choice.view(N, G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N,G]
        else:
            group_scores = grouped.max(dim=-1).values
        group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices  # [N,topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        keep = keep[:, :, None].expand(N, G, E // G).reshape(N, E)
        choice = choice.masked_fill(~keep, float("-inf"))
    topk_ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
    return topk_ids, expert_weights(scores, topk_ids, cfg), scores


def expert_weights(scores: torch.Tensor, topk_ids: torch.Tensor, cfg: DeepseekConfig) -> torch.Tensor:
    """scores [N,E], chosen experts [N,K] -> mixing weights [N,K]: the unbiased scores of the chosen experts,
    normalised (+1e-20) and scaled; differentiable in the router weights of exactly those experts."""
    topk_weights = scores.gather(1, topk_ids)
    if cfg.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * cfg.routed_scaling_factor


def replay_routing(own_ids: torch.Tensor, replay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing replay (R3): own_ids, replay [N,K] (replay rows with a negative id: not recorded, route freely) ->
    (ids to use [N,K], recorded [N] bool, differs [N] bool: the token's own expert set is not the recorded one)."""
    recorded = (replay >= 0).all(-1)  # [N]
    ids = torch.where(recorded[:, None], replay.to(own_ids.dtype), own_ids)
    differs = recorded & (own_ids.sort(-1).values != ids.sort(-1).values).any(-1)
    return ids, recorded, differs


class Gate(nn.Module):
    """Router weights [E,D] and the selection-only correction bias [E], kept in fp32 whatever the model dtype."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        bias = self.e_score_correction_bias  # .to(dtype) must not round it: follow the device only
        super()._apply(fn, recurse)
        if bias is not None:
            self.e_score_correction_bias = bias.to(self.weight.device)
        return self


class Experts(nn.Module):
    """Routed expert weights in the fused layout of transformers 5.19 and grpo/kernels/moe.py:
    gate_up_proj [E,2I,D] (gate rows first, then up), down_proj [E,D,I]."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    @torch.compiler.disable  # runtime.compile: the sorted-row kernel (data-dependent sizes, C loops) runs eagerly
    def forward(self, x, topk_ids, topk_weights):
        """x [N,D], experts [N,K] with weights [N,K] -> [N,D] (a module call, so peft's LoRA on these 3-D
        parameters, target_parameters, applies)."""
        return moe_ffn(x, topk_ids, topk_weights, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    """DeepSeekMoE: shared experts on every token plus K of E fine-grained routed experts.
    Records each forward's choice (`last_topk_ids`) for load logging and the bias update, and the optional
    sequence-wise balance loss (`aux_loss`)."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)  # tokens since update
        # routing statistics since the last routing_stats(): [replayed tokens, of them routed differently by the
        # model itself, tokens, summed router entropy] (training forwards only)
        self.register_buffer("routing", torch.zeros(4, dtype=torch.float64), persistent=False)
        self.last_topk_ids = None
        self.aux_loss = None

    def _apply(self, fn, recurse=True):
        load, routing = self.load, self.routing  # token counts stay fp32/fp64 (exact) in a bf16 model
        super()._apply(fn, recurse)
        self.load, self.routing = load.to(self.gate.weight.device), routing.to(self.gate.weight.device)
        return self

    def forward(self, x, replay: torch.Tensor | None = None):
        """x [B,S,D] -> [B,S,D]. replay [B*S,K]: experts recorded by the sampler for each token (negative: none),
        used instead of the router's own choice; the mixing weights stay differentiable (expert_weights)."""
        cfg = self.cfg
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        topk_ids, topk_weights, scores = route(flat, self.gate.weight, self.gate.e_score_correction_bias, cfg)
        if self.training:
            with torch.no_grad():
                p = scores / scores.sum(-1, keepdim=True)  # [N,E] the router's distribution over experts
                self.routing[2] += flat.shape[0]
                self.routing[3] += -(p * p.clamp_min(1e-30).log()).sum().double()
        if replay is not None:
            topk_ids, recorded, differs = replay_routing(topk_ids, replay)
            topk_weights = expert_weights(scores, topk_ids, cfg)
            if self.training:
                self.routing[0] += recorded.sum()
                self.routing[1] += differs.sum()
        self.last_topk_ids = topk_ids.detach()
        self.aux_loss = None
        if self.training and cfg.aux_loss_alpha > 0:
            # V3 eq. 17-20, per sequence: alpha * sum_i f_i P_i, f_i = E/(K*S) * #tokens choosing i
            E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
            p = (scores / scores.sum(-1, keepdim=True)).view(B, S, E).mean(1)  # [B,E]
            chosen = torch.zeros(B * S, E, device=x.device).scatter_(1, topk_ids, 1.0).view(B, S, E)
            f = chosen.sum(1) * E / (K * S)  # [B,E]
            self.aux_loss = cfg.aux_loss_alpha * (f * p).sum(-1).mean()
        routed = self.experts(flat, topk_ids, topk_weights)
        return routed.view(B, S, D) + self.shared_experts(x)


# ----------------------------------------------------------------------------------------------- blocks
class DecoderLayer(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then x + FFN(norm(x)); FFN is dense for the first k layers, else MoE."""

    def __init__(self, cfg: DeepseekConfig, idx: int):
        super().__init__()
        self.idx = idx
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if idx >= cfg.first_k_dense_replace else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, replay=None):
        """replay [B*S,K]: the sampler's experts for an MoE layer (routing replay), else None."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.idx)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, replay) if replay is not None else self.mlp(h))


class SharedHead(nn.Module):
    """The MTP module's final norm (its output head is the main lm_head while training)."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    """Multi-token-prediction depth k (V3 sec. 2.2): h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h^{k-1}_i)]),
    one decoder layer, shared_head.norm, then the shared output head predicts t_{i+k+1}.
    Names match vLLM's DeepSeekMultiTokenPredictorLayer (deepseek_mtp.py), as in the layer-61 keys of V3."""

    def __init__(self, cfg: DeepseekConfig, idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(cfg, idx)
        self.shared_head = SharedHead(cfg)

    def forward(self, emb, h_prev, positions, cos, sin, mask):
        """emb, h_prev [B,S,D] (emb of token i+k, hidden of token i) -> normed hidden [B,S,D]."""
        emb = torch.where(positions[..., None] == 0, 0.0, emb)  # vLLM zeroes the embedding at position 0
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.shared_head.norm(self.block(h, cos, sin, mask))


@dataclass
class CausalLMOutput:
    """What forward returns (field names as transformers' outputs)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    past_key_values: MLACache | None = None
    aux_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None


def causal_lm_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the head weight [V,D] over hidden states h [B,S,D] (h at i predicts
    labels[:, i+1]; -100 is ignored), through fused_logprob: no [B,S,V] logits in forward or backward."""
    targets = labels[:, 1:].flatten()  # [B*(S-1)]
    logp, _ = fused_logprob(h[:, :-1].flatten(0, 1), weight, targets)
    return -logp.sum() / (targets >= 0).sum()


class Backbone(nn.Module):
    """Embedding, decoder layers, final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def packed_documents(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B,S] document index of each token of packed rows (a new document wherever the positions do not step by
    1, as transformers' find_packed_sequence_indices), or None when every row is one document."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    docs = (step != 1).cumsum(-1)  # [B,S]
    return None if bool((docs[:, -1] == 0).all()) else docs


def cross_document_ignored(labels: torch.Tensor, docs: torch.Tensor | None, k: int = 0) -> torch.Tensor:
    """labels[:, k:] [B,S-k] with -100 wherever the target (read at i+1 by the shifted loss, token i+k+1) lies
    in another document than its predictor at i: packed rows never predict across documents."""
    lab = labels[:, k:]
    if docs is None:
        return lab
    S = docs.shape[1]
    return torch.cat([lab[:, :1], lab[:, 1:].masked_fill(docs[:, k + 1:] != docs[:, :S - k - 1], -100)], dim=1)


def attention_mask_3d(attention_mask: torch.Tensor | None, B: int, S: int, past: int, device,
                      docs: torch.Tensor | None = None) -> torch.Tensor:
    """[B,S,T] bool: new token i sees cached/new token j <= past+i that the 2D [B,T] padding mask keeps and,
    for packed rows (docs [B,S], no cache), only tokens of its own document."""
    T = past + S
    allowed = torch.arange(T, device=device)[None, :] <= (past + torch.arange(S, device=device))[:, None]
    allowed = allowed[None].expand(B, S, T)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, -T:].bool()
    if docs is not None:
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])
    return allowed


# ----------------------------------------------------------------------------------------------- model
class DeepseekForCausalLM(nn.Module):
    """The causal LM r1kit trains and samples from; forward() follows transformers' DeepseekV3ForCausalLM."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList([MTPModule(cfg, cfg.num_hidden_layers + k)
                                  for k in range(cfg.num_nextn_predict_layers)])
        inv_freq, self.rope_scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.gradient_checkpointing = False
        self.init_weights()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self):
        """N(0, initializer_range) for every matrix, ones for norms, zeros for the router bias."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config)[0].to(self.inv_freq.device)  # rope angles stay fp32
        return self

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def gradient_checkpointing_enable(self, **_):
        """Recompute each decoder layer in backward instead of storing its activations."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    def set_mla_mode(self, mode: str):
        """'auto' | 'expanded' | 'absorbed' for every attention layer (see MLA)."""
        for m in self.modules():
            if isinstance(m, MLA):
                m.mode = mode

    def rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B,S,r/2] for integer positions [B,S] (YaRN mscale folded in)."""
        freqs = position_ids[..., None].float() * self.inv_freq  # [B,S,r/2]
        return (freqs.cos() * self.rope_scale).to(dtype), (freqs.sin() * self.rope_scale).to(dtype)

    def run_layer(self, layer, x, cos, sin, mask, cache, replay=None, real=None):
        """One decoder layer, checkpointed while training if asked; records expert load (of the `real` tokens)."""
        if self.gradient_checkpointing and self.training and cache is None:
            x = checkpoint(layer, x, cos, sin, mask, None, replay, use_reentrant=False)
        else:
            x = layer(x, cos, sin, mask, cache, replay)
        self.count_load(layer, real)
        return x

    def count_load(self, layer, real=None):
        """Add the tokens each routed expert of `layer` just received to its load counter (training only).
        real [B*S] bool: the positions that are tokens, not padding (None: all), so the load, and the bias update
        it drives, does not depend on how a batch was padded (or split over ranks)."""
        if self.training and isinstance(layer.mlp, MoE):
            ids = layer.mlp.last_topk_ids  # [B*S, K]
            layer.mlp.load += torch.bincount((ids if real is None else ids[real]).flatten(),
                                             minlength=self.config.n_routed_experts).float()

    def hidden(self, input_ids, attention_mask, position_ids, cache=None, routed_experts=None) -> torch.Tensor:
        """input_ids, position_ids [B,S]; attention_mask [B,past+S] or None -> final normed hidden states [B,S,D]:
        what the LM head reads (forward, and fused log-probs that never form the logits).
        routed_experts [B,S,M,K] (M = MoE layers, negative = not recorded): routing replay, see MoE.forward."""
        B, S = input_ids.shape
        replays = iter(routed_experts.flatten(0, 1).unbind(1)) if routed_experts is not None else None  # M x [B*S,K]
        x = self.model.embed_tokens(input_ids)  # [B,S,D]
        cos, sin = self.rope(position_ids, x.dtype)
        past = cache.get_seq_length() if cache is not None else 0
        docs = packed_documents(position_ids) if attention_mask is None and cache is None else None  # as HF
        mask = attention_mask_3d(attention_mask, B, S, past, x.device, docs)  # [B,S,T]
        real = attention_mask[:, -S:].reshape(-1) > 0 if attention_mask is not None else None  # [B*S]
        for layer in self.model.layers:
            replay = next(replays) if replays is not None and isinstance(layer.mlp, MoE) else None
            x = self.run_layer(layer, x, cos, sin, mask, cache, replay, real)
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                labels=None, logits_to_keep=0, return_logits=True, routed_experts=None, **_) -> CausalLMOutput:
        """input_ids [B,S]; attention_mask [B,past+S] (1 = real token, left padding ok); position_ids [B,S];
        labels [B,S] (shifted inside, -100 ignored) -> logits [B,S or logits_to_keep,V], loss, cache.
        return_logits=False leaves logits None: a training step that only needs the loss never forms [B,S,V]."""
        cfg = self.config
        B, S = input_ids.shape
        cache = past_key_values if past_key_values is not None else (MLACache() if use_cache else None)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(S, device=input_ids.device))[None].expand(B, S)
        h = self.hidden(input_ids, attention_mask, position_ids, cache, routed_experts)  # [B,S,D]
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep]) if return_logits else None
        out = CausalLMOutput(logits=logits, past_key_values=cache if use_cache else None)
        aux = [l.mlp.aux_loss for l in self.model.layers if isinstance(l.mlp, MoE) and l.mlp.aux_loss is not None]
        if aux:  # training with aux_loss_alpha > 0: a caller with its own loss may add out.aux_loss (GRPO does not)
            out.aux_loss = torch.stack(aux).sum()
        if labels is None:
            return out
        # packed rows (attention_mask None, positions restarting at 0): no target in another document
        docs = packed_documents(position_ids) if attention_mask is None and cache is None else None
        out.loss = causal_lm_loss(h[:, keep], self.lm_head.weight,
                                  labels[:, keep] if logits_to_keep else cross_document_ignored(labels, docs))
        if out.aux_loss is not None:
            out.loss = out.loss + out.aux_loss
        if self.mtp:
            # depth k sees hidden h^{k-1}_i and token t_{i+k}; its logits at i predict t_{i+k+1}
            mtp_losses, h_prev = [], h
            cos, sin = self.rope(position_ids, h.dtype)
            for k, module in enumerate(self.mtp, start=1):
                if S - k < 2:
                    break
                pos = position_ids[:, :S - k]
                emb = self.model.embed_tokens(input_ids[:, k:])
                am = attention_mask[:, -S:][:, :S - k] if attention_mask is not None else None
                m = attention_mask_3d(am, B, S - k, 0, h.device, docs[:, :S - k] if docs is not None else None)
                h_prev = module(emb, h_prev[:, :S - k], pos, cos[:, :S - k], sin[:, :S - k], m)
                self.count_load(module.block, am.reshape(-1) > 0 if am is not None else None)
                mtp_losses.append(causal_lm_loss(h_prev, self.lm_head.weight, cross_document_ignored(labels, docs, k)))
            if mtp_losses:
                out.mtp_loss = torch.stack(mtp_losses).mean()
                out.loss = out.loss + cfg.mtp_loss_weight * out.mtp_loss
        return out

    # ------------------------------------------------------------------------------------- balancing
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def routed_layers(self) -> list[MoE]:
        """The decoder's MoE layers in order (MTP blocks excluded): what routing replay records and replays."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def routing_stats(self) -> dict[str, float]:
        """Router entropy (nats, mean over tokens and MoE layers) and, under routing replay, the fraction of
        replayed tokens the trainer would have routed to another expert set; counters reset."""
        layers = self.routed_layers()
        total = sum(m.routing for m in layers) if layers else torch.zeros(4, dtype=torch.float64)
        for m in layers:
            m.routing.zero_()
        stats = {}
        if total[2] > 0:
            stats["moe/router_entropy"] = float(total[3] / total[2])
        if total[0] > 0:
            stats["moe/replay_mismatch_frac"] = float(total[1] / total[0])
        return stats

    def expert_load_stats(self) -> dict[str, float]:
        """Load imbalance max/mean of routed-token counts since the last bias update, per MoE layer and overall."""
        stats, ratios = {}, []
        for i, m in enumerate(self.moe_layers()):
            if m.load.sum() > 0:
                ratio = (m.load.max() / m.load.mean()).item()
                stats[f"moe/load_max_over_mean/{i}"] = ratio
                ratios.append(ratio)
        if ratios:  # the mean over MoE layers
            stats["moe/load_max_over_mean"] = sum(ratios) / len(ratios)
        return stats

    @torch.no_grad()
    def update_expert_bias(self, gamma: float | None = None) -> dict[str, float]:
        """Aux-loss-free balancing (V3 sec. 2.1.2): call after each optimizer step. Overloaded experts' bias
        goes down by gamma, underloaded ones' up (sign of mean load - load); then the counters reset.
        Returns the load stats of the step that just ended."""
        gamma = self.config.bias_update_speed if gamma is None else gamma
        stats = self.expert_load_stats()
        for m in self.moe_layers():
            bias = m.gate.e_score_correction_bias
            if bias is not None and m.load.sum() > 0:
                bias += gamma * torch.sign(m.load.mean() - m.load)
            m.load.zero_()
        return stats

    # ------------------------------------------------------------------------------------- checkpoints
    def hf_state_dict(self, state_dict: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(main, mtp) tensors under HF/vLLM key names: experts split per expert; MTP depth k becomes
        model.layers.{num_hidden_layers+k-1}.* with its own copies of embed_tokens and shared_head.head.
        state_dict: the full tensors to write instead of the module's own (FSDP2 / ZeRO-3 gather them; a tied
        head may be absent)."""
        cfg = self.config
        main, mtp = {}, {}
        sd = self.state_dict() if state_dict is None else state_dict
        for name, t in sd.items():
            if name.startswith("mtp."):
                k, rest = name[4:].split(".", 1)
                dst, name = mtp, f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest.replace('block.', '', 1)}"
            else:
                dst = main
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if name.endswith("experts.gate_up_proj"):
                gate, up = t.chunk(2, dim=1)
                for e in range(t.shape[0]):
                    dst[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e]
                    dst[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e]
            elif name.endswith("experts.down_proj"):
                for e in range(t.shape[0]):
                    dst[name.replace("down_proj", f"{e}.down_proj.weight")] = t[e]
            else:
                dst[name] = t
        for k in range(len(self.mtp)):
            prefix = f"model.layers.{cfg.num_hidden_layers + k}."
            mtp[prefix + "embed_tokens.weight"] = sd["model.embed_tokens.weight"]
            mtp[prefix + "shared_head.head.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        return ({k: v.detach().contiguous().clone() for k, v in main.items()},
                {k: v.detach().contiguous().clone() for k, v in mtp.items()})

    def save_pretrained(self, path: str, state_dict: dict | None = None, **_):
        """Write config.json + model.safetensors (+ mtp.safetensors) atomically (temp dir, then rename).
        MTP layers go to their own file, which transformers (single-file load) skips and vLLM (globs *.safetensors)
        reads, so transformers reports no unexpected keys and vLLM's MTP loader finds layer N.*"""
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=parent)
        main, mtp = self.hf_state_dict(state_dict)
        dtype = str(main["model.embed_tokens.weight"].dtype).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**self.config.to_hf_dict(), "dtype": dtype}, f, indent=2)
        save_file(main, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if mtp:
            save_file(mtp, os.path.join(tmp, "mtp.safetensors"), metadata={"format": "pt"})
        if os.path.exists(path):  # keep other files (tokenizer, trainer_state/) of an existing checkpoint
            for name in os.listdir(path):
                if name not in os.listdir(tmp) and not name.endswith(".safetensors") and name != \
                        "model.safetensors.index.json":
                    shutil.move(os.path.join(path, name), os.path.join(tmp, name))
            old = tempfile.mkdtemp(prefix=".tmp-old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, **overrides) -> "DeepseekForCausalLM":
        """Load an HF-format DeepSeek-V2/V3 directory: per-expert or fused expert keys, an MTP layer
        (model.layers.{N}.*) when num_nextn_predict_layers > 0, fp32 router bias. Strict about missing keys, except
        that absent MTP weights leave the MTP modules at their initialisation (with a warning)."""
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        cfg = DeepseekConfig.from_dict({**raw, **overrides})
        model = cls(cfg)
        tensors = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(path, name)))
        state, experts = {}, {}
        N = cfg.num_hidden_layers
        for name, t in tensors.items():
            parts = name.split(".")
            if "rotary_emb" in name:
                continue
            if name.startswith("model.layers.") and int(parts[2]) >= N:  # an MTP layer
                k = int(parts[2]) - N
                rest = ".".join(parts[3:])
                if k >= cfg.num_nextn_predict_layers or rest in ("embed_tokens.weight", "shared_head.head.weight"):
                    continue
                top = rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head")
                name = f"mtp.{k}.{rest}" if top else f"mtp.{k}.block.{rest}"
                parts = name.split(".")
            if ".experts." in name and parts[-1] == "weight" and parts[-3].isdigit():
                prefix = name[: name.index(".experts.") + len(".experts.")]
                experts.setdefault(prefix, {})[(int(parts[-3]), parts[-2])] = t
                continue
            state[name] = t
        for prefix, ws in experts.items():  # per-expert -> fused [E,2I,D], [E,D,I]
            E = cfg.n_routed_experts
            lacking = [f"{prefix}{e}.{w}.weight" for e in range(E) for w in ("gate_proj", "up_proj", "down_proj")
                       if (e, w) not in ws]
            if lacking:
                raise ValueError(f"checkpoint {path} does not match: missing {lacking[:8]}")
            state[prefix + "gate_up_proj"] = torch.stack(
                [torch.cat([ws[(e, "gate_proj")], ws[(e, "up_proj")]]) for e in range(E)])
            state[prefix + "down_proj"] = torch.stack([ws[(e, "down_proj")] for e in range(E)])
        if cfg.tie_word_embeddings:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if cfg.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in state):
            # e.g. written by transformers, which drops MTP layers: the config says MTP, the weights do not
            warnings.warn(f"{path}: no MTP weights (model.layers.{N}.*); MTP modules start freshly initialised")
            missing = [k for k in missing if not k.startswith("mtp.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match: missing {missing[:8]}, unexpected {unexpected[:8]}")
        return model.to(dtype)
