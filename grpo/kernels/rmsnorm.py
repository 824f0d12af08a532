"""RMSNorm: y = weight * (x / sqrt(mean(x^2) + eps)), computed in fp32 and returned in x.dtype.

Matches transformers' DeepseekV3RMSNorm up to where the cast happens: HF casts the normalised x back to
x.dtype before multiplying by weight; here the product is formed in fp32 and cast once (identical in fp32).
Dispatch: Triton on CUDA tensors (one program per row, fused forward and backward), torch elsewhere.
"""

from __future__ import annotations

import torch

try:  # triton is optional: CPU installs run the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def rms_norm_reference(x, weight, eps: float = 1e-6):
    """Plain-torch reference, autograd through every op: 'xh,h->xh' scaled by rsqrt(mean_h x^2 + eps)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton: forward one program per row; backward G programs each striding over rows, partial dweight summed after
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        tl.store(rstd_ptr + row, rstd)
        tl.store(y_ptr + row * H + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, R, H, BLOCK: tl.constexpr):
        # dx = rstd * (dy*w - xhat * mean(dy*w*xhat)),  dw = sum_rows dy * xhat
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), tl.float32)
        for row in range(pid, R, G):
            x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            dyw = dy * w
            dx = rstd * (dyw - xhat * (tl.sum(dyw * xhat, axis=0) / H))
            tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * xhat
        tl.store(dw_ptr + pid * H + cols, dw, mask=mask)


class _RMSNormTriton(torch.autograd.Function):
    """Triton RMSNorm; saves x and the per-row rstd[R] (fp32)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # [R, H]
        R, H = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(R, dtype=torch.float32, device=x.device)
        BLOCK = triton.next_power_of_2(H)
        _rms_fwd_kernel[(R,)](x2, weight.contiguous(), y, rstd, H, eps, BLOCK=BLOCK)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        R, H = x2.shape
        dy2 = dy.reshape(R, H).contiguous()
        dx = torch.empty_like(x2)
        G = max(1, min(R, 256))
        dw_part = torch.empty(G, H, dtype=torch.float32, device=x2.device)  # [G, H] per-program partial dweight
        BLOCK = triton.next_power_of_2(H)
        _rms_bwd_kernel[(G,)](dy2, x2, weight.contiguous(), rstd, dx, dw_part, R, H, BLOCK=BLOCK)
        return dx.view(ctx.shape), dw_part.sum(0).to(weight.dtype), None


def rms_norm(x, weight, eps: float = 1e-6, *, impl: str | None = None):
    """RMSNorm over the last dim of x[..., H] with weight[H]; fp32 maths, output in x.dtype.
    impl: None (Triton on CUDA, torch elsewhere), "triton" or "torch"."""
    if impl is None:
        impl = "triton" if (x.is_cuda and triton is not None) else "torch"
    if impl == "torch":
        return rms_norm_reference(x, weight, eps)
    if impl == "triton":
        return _RMSNormTriton.apply(x, weight, eps)
    raise ValueError(f"unknown rms_norm impl {impl!r}")
