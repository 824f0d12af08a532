"""Tolerances from rounding-error analysis, for comparing two evaluations of the same maths that differ only in
summation order or precision (a kernel against its reference, r1kit against transformers).

Model (Higham & Mary, "A new approach to probabilistic rounding error analysis", 2019): a sum or dot product of n
terms, evaluated in any order with unit roundoff u (half the dtype's epsilon), is within lam * sqrt(n) * u * sum|terms|
of the exact value, except with probability about 2 * n * exp(-lam**2 / 2); at lam = 8 that is ~1e-14 per element,
so no CPU's vector width or order can trip it by chance, yet any real bug (an O(1) relative error) is still far out.
Each elementwise operation (a product, exp, a cast) adds at most u relative to the magnitude it carries. Along a
chain of reductions the relative errors add to first order, and `mag` (the same computation on absolute values)
bounds every intermediate, so two evaluations differ by at most
    2 * u * (lam * sum_i sqrt(n_i) + roundings) * mag       (elementwise; 2 = both sides carry error).
"""

from __future__ import annotations

import math

import torch

LAM = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding to nearest in `dtype`."""
    return torch.finfo(dtype).eps / 2


def rounding_tol(mag, reductions=(), roundings: int = 0, dtype=torch.float32, sides: int = 2):
    """Elementwise bound on |a - b| (tensor like mag): `reductions` are the lengths of the sums along the
    computation, `roundings` its elementwise rounding steps, `sides` how many of the two evaluations round."""
    u = unit_roundoff(dtype)
    return sides * u * (LAM * sum(math.sqrt(n) for n in reductions) + roundings) * mag


def assert_within(got, want, tol, what: str = "") -> None:
    """|got - want| <= tol elementwise (tol a tensor or float), with the worst element's ratio in the message."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(want)
    err = (got - want).abs()
    assert torch.isfinite(got).all() == torch.isfinite(want).all(), f"{what}: non-finite values differ"
    ratio = err / tol.clamp_min(torch.finfo(torch.float64).tiny)
    worst = int(ratio.argmax())
    assert bool((err <= tol).all()), (f"{what}: |diff| {err.flatten()[worst].item():.3e} > bound "
                                      f"{tol.flatten()[worst].item():.3e} at flat index {worst} "
                                      f"(worst ratio {ratio.max().item():.2f})")


def measured_floor(ref32, ref64) -> float:
    """The reference's own fp32 rounding error on this input, measured against its fp64 evaluation (max |diff|):
    for whole models, where an a-priori bound would need every layer's conditioning."""
    return (ref32.double() - ref64.double()).abs().max().item()


def parity_tol(ref_model, run, spread: float = 4.0) -> float:
    """Bound on max |ours - reference| for two fp32 models of the same maths: both carry fp32 rounding error of the
    size the reference shows against its own float64 copy (`run(model)` -> output), so 2 sides x `spread` (how
    far the largest error moves between summation orders) times that floor. The floor is checked to be small
    against the output, so a routing flip in the float64 copy cannot make the bound vacuous."""
    import copy

    with torch.no_grad():
        ref32 = run(ref_model)
        ref64 = copy.deepcopy(ref_model).double()
        if hasattr(ref64.config, "_experts_implementation"):  # transformers' grouped_mm has no float64 kernel
            ref64.config._experts_implementation = "eager"
        ref64 = run(ref64)
    floor = measured_floor(ref32, ref64)
    assert floor <= 1e-3 * ref32.abs().max().item(), f"fp32 floor {floor:.2e} is not small: a routing flip?"
    return 2 * spread * floor
