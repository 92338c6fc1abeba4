"""One fused kernel for an 8-bit blockwise AdamW step (`lowbit.optim.AdamW8bit` on CUDA).

The torch path of the optimizer runs ~20 kernels per tensor and step (decode two code tensors, the
update, two absmax reductions, two nearest-code searches, the casts) and materialises both moments in
fp32: on a GPU it ran at 0.3–0.5× torch AdamW's speed (bench/RESULTS.md). Here one program owns one
quantization block of one parameter and does the whole step in registers: it reads the parameter, its
gradient, the two 8-bit code blocks and their absmax, decodes the moments, applies the AdamW update,
writes the parameter, and re-quantizes both moments with the block's new absmax — the nearest code by
an 8-step binary search over the map's decision boundaries (the midpoints between sorted neighbours,
ties to the smaller value, exactly `formats.codebooks.nearest_code`'s rule). Per parameter it moves
the 2 bytes of codes (both ways) plus the parameter and gradient; nothing else touches memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SEARCH_STEPS = (128, 64, 32, 16, 8, 4, 2, 1)  # a binary search over 256 decision slots


@dataclass(frozen=True)
class CodeSearch:
    """A code map prepared for the kernel: its 255 decision boundaries padded to 256 with +inf, the code of
    each of the 256 slots, and the map itself (code → value)."""

    boundaries: torch.Tensor  # (256,) float32, ascending
    codes: torch.Tensor  # (256,) int32: slot i (i boundaries below the value) → code
    values: torch.Tensor  # (256,) float32: code → value

    @classmethod
    def from_map(cls, codebook: torch.Tensor) -> CodeSearch:
        if codebook.numel() != 256:
            raise ValueError(f"an 8-bit code map has 256 entries, got {codebook.numel()}")
        # sorted by value, -0.0 before +0.0 (as nearest_code orders them)
        key = codebook.double() - (torch.signbit(codebook) & (codebook == 0)).double() * 1e-300
        order = torch.argsort(key, stable=True)
        ordered = codebook[order].float()
        inf = torch.full((1,), float("inf"), dtype=torch.float32, device=codebook.device)
        boundaries = torch.cat([(ordered[:-1] + ordered[1:]) / 2, inf])
        return cls(boundaries.contiguous(), order.to(torch.int32).contiguous(), codebook.float().contiguous())


@triton.jit
def _nearest(x, boundaries_ptr, codes_ptr):
    """Code of the nearest map value for each x: the number of boundaries strictly below x, as a code."""
    slot = tl.zeros(x.shape, dtype=tl.int32)
    for step in tl.static_range(8):
        half = 128 >> step
        below = tl.load(boundaries_ptr + slot + (half - 1)) < x
        slot = tl.where(below, slot + half, slot)
    return tl.load(codes_ptr + slot)


@triton.jit
def _requantize(x, mask, code_ptr, absmax_ptr, offs, pid, boundaries_ptr, codes_ptr):
    absmax = tl.max(tl.abs(x), axis=0)
    inv = 1.0 / tl.maximum(absmax, 1e-38)  # the reciprocal, then a product, as the torch path does
    scaled = tl.minimum(tl.maximum(x * inv, -1.0), 1.0)
    tl.store(code_ptr + offs, _nearest(scaled, boundaries_ptr, codes_ptr).to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + pid, absmax)


@triton.jit
def _adamw8bit_kernel(p_ptr, g_ptr, m_code_ptr, v_code_ptr, m_absmax_ptr, v_absmax_ptr,
                      m_values_ptr, m_bounds_ptr, m_codes_ptr, v_values_ptr, v_bounds_ptr, v_codes_ptr,
                      n, block_size, beta1, beta2, eps, decay, step_size, bias2_sqrt,
                      BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offs = pid.to(tl.int64) * block_size + lane
    mask = (lane < block_size) & (offs < n)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_code = tl.load(m_code_ptr + offs, mask=mask, other=0).to(tl.int32)
    v_code = tl.load(v_code_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(m_values_ptr + m_code) * tl.load(m_absmax_ptr + pid)
    v = tl.load(v_values_ptr + v_code) * tl.load(v_absmax_ptr + pid)
    m = m * beta1 + (1.0 - beta1) * g
    v = v * beta2 + (1.0 - beta2) * g * g
    m = tl.where(mask, m, 0.0)  # lanes past the tensor count as zeros in the block's absmax
    v = tl.where(mask, v, 0.0)
    denom = tl.sqrt_rn(v) / bias2_sqrt + eps
    p = p * decay - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    _requantize(m, mask, m_code_ptr, m_absmax_ptr, offs, pid, m_bounds_ptr, m_codes_ptr)
    _requantize(v, mask, v_code_ptr, v_absmax_ptr, offs, pid, v_bounds_ptr, v_codes_ptr)


def adamw8bit_step(param: torch.Tensor, grad: torch.Tensor, state: dict, signed: CodeSearch, unsigned: CodeSearch,
                   *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                   block_size: int) -> None:  # fmt: skip
    """One AdamW step of `param` in place, its moments in ``state`` (AdamW8bit's codes and absmax) likewise.

    ``step`` is the step number after this update (≥ 1), for the bias corrections."""
    if not param.is_contiguous() or grad.shape != param.shape:
        raise ValueError("adamw8bit_step takes a contiguous parameter and a gradient of its shape")
    n = param.numel()
    blocks = triton.cdiv(n, block_size)
    _adamw8bit_kernel[(blocks,)](
        param, grad.contiguous(), state["exp_avg_codes"], state["exp_avg_sq_codes"], state["exp_avg_absmax"],
        state["exp_avg_sq_absmax"], signed.values, signed.boundaries, signed.codes, unsigned.values,
        unsigned.boundaries, unsigned.codes, n, block_size, beta1, beta2, eps, 1.0 - lr * weight_decay,
        lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5, BLOCK=triton.next_power_of_2(block_size),
        num_warps=4 if block_size <= 1024 else 8,
    )  # fmt: skip
