"""Calibrated 4-bit rounding (GPTQ) into llama.cpp's IQ4_NL blocks, for matrices K-quants cannot hold.

llama.cpp's Q4_K needs rows that are a multiple of 256 values. For other widths (576 in SmolLM2-135M,
896 in Qwen2-0.5B) its Q4_K_M falls back to 5.5-bit Q5_0. IQ4_NL fits any multiple of 32 at Q4_K's
4.5 bits, but rounded to nearest it cost the default task's student holdout F1 (docs/benchmarks.md).

GPTQ (Frantar et al., 2022) rounds one input column at a time and moves each column's rounding error
onto the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs on calibration
text, so that the layer's *outputs* on that kind of text stay close rather than its weights. The blocks
it writes are ordinary IQ4_NL: any llama.cpp reads them. The KL to the float model with and without it
is measured in docs/benchmarks.md.
"""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 32
# IQ4_NL's 16 levels (ggml's kvalues_iq4nl): a block stores one fp16 scale d and 32 4-bit indices.
IQ4_NL_VALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                             dtype=torch.float64)
_EDGES = (IQ4_NL_VALUES[1:] + IQ4_NL_VALUES[:-1]) / 2
_SCALE_TRIES = torch.linspace(0.8, 1.2, 21, dtype=torch.float64)


def _nearest(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest IQ4_NL level for each value (already divided by the block scale)."""
    return torch.bucketize(x, _EDGES)


def block_scales(w: torch.Tensor) -> torch.Tensor:
    """One fp16-representable scale per row of `w` [rows, 32] with the least squared rounding error.

    Tries scales around max|w|/127 (the extreme value on the extreme level), refits each by least
    squares for the indices it picks, and keeps the best, like ggml's own IQ4_NL search.
    """
    extreme = w.gather(1, w.abs().argmax(1, keepdim=True))[:, 0]
    base = extreme / IQ4_NL_VALUES[0]
    best_d = torch.where(base == 0, torch.ones_like(base), base)
    best_err = torch.full_like(base, float("inf"))
    for f in _SCALE_TRIES:
        d = torch.where(base == 0, torch.ones_like(base), base * f)
        q = IQ4_NL_VALUES[_nearest(w / d[:, None])]
        d = (q * w).sum(1) / (q * q).sum(1).clamp_min(1e-30)  # least-squares scale for these levels
        d = torch.where(d == 0, torch.ones_like(d), d).to(torch.float16).to(torch.float64)
        err = ((IQ4_NL_VALUES[_nearest(w / d[:, None])] * d[:, None] - w) ** 2).sum(1)
        better = err < best_err
        best_err, best_d = torch.where(better, err, best_err), torch.where(better, d, best_d)
    return best_d


def pack_iq4_nl(idx: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """ggml's block_iq4_nl bytes: per block the fp16 scale, then byte j = index j | index j+16 << 4."""
    rows, cols = idx.shape
    nb = cols // BLOCK
    q = idx.to(torch.uint8).reshape(rows, nb, BLOCK).numpy()
    qs = q[..., :16] | (q[..., 16:] << 4)
    d = scales.numpy().astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(rows, nb * 18)


def quantize_iq4_nl(weight, hessian: torch.Tensor | None = None, damp: float = 0.01):
    """Quantize `weight` [rows, cols] to IQ4_NL: (block bytes [rows, cols/32*18], dequantized float32).

    With `hessian` (X^T X of the layer's inputs, [cols, cols]) the rounding is GPTQ's; without it,
    round-to-nearest. Rows are independent, so a row permutation (llama.cpp's Q/K layout) commutes.
    """
    w = torch.as_tensor(np.asarray(weight), dtype=torch.float64).clone()
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"IQ4_NL needs rows that are a multiple of {BLOCK} values, got {cols}")
    idx = torch.empty(rows, cols, dtype=torch.long)
    scales = torch.empty(rows, cols // BLOCK, dtype=torch.float64)
    if hessian is None:
        for b in range(cols // BLOCK):
            blk = w[:, b * BLOCK:(b + 1) * BLOCK]
            scales[:, b] = d = block_scales(blk)
            idx[:, b * BLOCK:(b + 1) * BLOCK] = _nearest(blk / d[:, None])
    else:
        u = _inverse_hessian_factor(hessian.to(torch.float64), w, damp)
        for b in range(cols // BLOCK):
            lo, hi = b * BLOCK, (b + 1) * BLOCK
            scales[:, b] = d = block_scales(w[:, lo:hi])  # from the weights as corrected so far
            for j in range(lo, hi):
                k = _nearest(w[:, j] / d)
                idx[:, j] = k
                err = (w[:, j] - IQ4_NL_VALUES[k] * d) / u[j, j]
                w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    deq = IQ4_NL_VALUES[idx] * scales.repeat_interleave(BLOCK, dim=1)
    return pack_iq4_nl(idx, scales), deq.to(torch.float32).numpy()


def _inverse_hessian_factor(h: torch.Tensor, w: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (GPTQ's error-propagation weights).

    An input that is always zero in calibration has a zero diagonal entry; it is set to 1 so the
    factorisation exists (its column then just rounds to nearest).
    """
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(len(h), dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@torch.no_grad()
def input_hessians(model, sequences: list[list[int]], module_names: list[str]) -> dict[str, torch.Tensor]:
    """X^T X / tokens of the inputs of each named linear layer, over `sequences` run one at a time."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in module_names]
    try:
        device = next(model.parameters()).device
        for ids in sequences:
            model(torch.tensor([ids], device=device))
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).cpu() for n in sums}
