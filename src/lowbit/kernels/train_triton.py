"""Triton kernels of the fused training ops: RMSNorm, SwiGLU, RoPE, the cross-entropy of a logits chunk and
LoRA's dropout.

All four are memory-bound elementwise / row-reduction passes: unfused, PyTorch runs each as several
kernels (casts to float32, pow, mean, rsqrt, mul, cast back, …), each a full read and write of the
activations in HBM, and autograd keeps their intermediates. Here each is one read and one write, computed
in float32 registers, with the backward recomputing what it needs from the saved inputs.

One program per row (RMSNorm, cross-entropy; RoPE: per (batch, position)), or per BLOCK elements
(SwiGLU). Rows are assumed to fit one block (hidden sizes ≤ 64K), except cross-entropy, which walks the
vocabulary in BLOCK-wide steps (online log-sum-exp, Milakov & Gimelshein 2018).

The torch-facing functions live in `norms.py`, `swiglu.py`, `rope.py` and `cross_entropy.py`; this
module is imported only when a kernel runs (importing lowbit.kernels never imports Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # LlamaRMSNorm rounds the normalised x to the input dtype before the weight multiplies it.
    xn = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (xn * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd(dy_ptr, saved_ptr, w_ptr, rstd_ptr, dx_ptr, stride_dy, stride_saved, stride_dx, n_cols,
                  FROM_OUTPUT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # y = w ⊙ x·r with r = (mean(x²) + eps)^-½  ⇒  dx = r·(g − x̂·mean(g ⊙ x̂)),  g = dy ⊙ w,
    # x̂ = x·r from the saved x, or y / w from the saved output y (FROM_OUTPUT)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    saved = tl.load(saved_ptr + row * stride_saved + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=1.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    if FROM_OUTPUT:
        xh = saved / w
    else:
        xh = saved * rstd
    g = dy * w
    dx = rstd * (g - xh * (tl.sum(g * xh, axis=0) / n_cols))
    tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """x (M, D) contiguous rows → (y (M, D) in out_dtype, rstd (M,) float32)."""
    m, d = x.shape
    y = torch.empty((m, d), dtype=out_dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(d)
    _rms_norm_fwd[(m,)](x, weight, y, rstd, x.stride(0), y.stride(0), d, eps, BLOCK=block,
                        num_warps=min(max(block // 256, 1), 16))  # fmt: skip
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, saved: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      from_output: bool = False) -> torch.Tensor:  # fmt: skip
    """dx (M, D) in x's dtype from the saved x, or from the saved output y (`from_output`, same dtype)."""
    m, d = saved.shape
    dx = torch.empty_like(saved)
    block = triton.next_power_of_2(d)
    _rms_norm_bwd[(m,)](dy, saved, weight, rstd, dx, dy.stride(0), saved.stride(0), dx.stride(0), d,
                        FROM_OUTPUT=from_output, BLOCK=block, num_warps=min(max(block // 256, 1), 16))
    return dx


@triton.jit
def _act_and_slope(g, GELU: tl.constexpr):
    """(act(g), act'(g)) in float32: SiLU, or GELU's tanh approximation
    0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))) with tanh(z) = 2σ(2z) − 1."""
    if GELU:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        act = 0.5 * g * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        sig = tl.sigmoid(g)
        act = g * sig
        slope = sig * (1.0 + g * (1.0 - sig))
    return act, slope


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # act(g) is rounded to the activation dtype before the product, as act_fn(gate) * up does.
    a = _act_and_slope(g, GELU)[0].to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs, (a * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
    # y = act(g)·u:  du = dy·act(g),  dg = dy·u·act'(g)  (SiLU: act' = σ(g)·(1 + g·(1 − σ(g))))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, slope = _act_and_slope(g, GELU)
    tl.store(du_ptr + offs, (dy * act).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dy * u * slope).to(dg_ptr.dtype.element_ty), mask=mask)


SWIGLU_BLOCK = 1024


@triton.jit
def _dropout(x_ptr, y_ptr, n, p, scale, seed, seed_ptr, BLOCK: tl.constexpr, SEED_IN_MEMORY: tl.constexpr):
    # element i is kept when the i-th Philox number of the seed is ≥ p: the same mask for the same seed
    # and shape on every call, so the backward draws it again instead of saving it. SEED_IN_MEMORY: the seed
    # is read from seed_ptr (drawn on the device, anew by each replay of a CUDA graph)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if SEED_IN_MEMORY:
        keep = tl.rand(tl.load(seed_ptr), offs) >= p
    else:
        keep = tl.rand(seed, offs) >= p
    tl.store(y_ptr + offs, tl.where(keep, x.to(tl.float32) * scale, 0.0).to(y_ptr.dtype.element_ty), mask=mask)


def dropout(x: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """x ⊙ keep / (1 - p) for a contiguous x, keep drawn from ``seed`` — a number, or a one-element integer
    tensor on x's device read by the kernel — (one read and one write of x)."""
    n = x.numel()
    if n >= 2**31:
        raise ValueError(f"dropout's kernel indexes with int32: {n} elements is too many")
    y = torch.empty_like(x)
    in_memory = torch.is_tensor(seed)
    _dropout[(triton.cdiv(n, SWIGLU_BLOCK),)](x, y, n, p, 1.0 / (1.0 - p), 0 if in_memory else seed,
                                              seed if in_memory else x, BLOCK=SWIGLU_BLOCK,
                                              SEED_IN_MEMORY=in_memory)  # fmt: skip
    return y


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) ⊙ up, act "silu" or "gelu_tanh"."""
    y = torch.empty_like(gate)
    n = gate.numel()
    _swiglu_fwd[(triton.cdiv(n, SWIGLU_BLOCK),)](gate, up, y, n, BLOCK=SWIGLU_BLOCK, GELU=act == "gelu_tanh")
    return y


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    act: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _swiglu_bwd[(triton.cdiv(n, SWIGLU_BLOCK),)](dy, gate, up, dg, du, n, BLOCK=SWIGLU_BLOCK, GELU=act == "gelu_tanh")
    return dg, du


@triton.jit
def _rope_heads(x_ptr, y_ptr, b, t, H, half, sxb, sxh, sxt, sxd, syb, syh, syt, syd, c1, c2, s1, s2,
                BACKWARD: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    # Forward: y = x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁) on the two halves of head_dim:
    #   y₁ = x₁·cos₁ − x₂·sin₁,  y₂ = x₂·cos₂ + x₁·sin₂.
    # Backward (the transpose of that linear map): dx₁ = dy₁·cos₁ + dy₂·sin₂,  dx₂ = dy₂·cos₂ − dy₁·sin₁.
    d = tl.arange(0, BD)
    h = tl.arange(0, BH)
    mask = (h < H)[:, None] & (d < half)[None, :]
    xo = x_ptr + b * sxb + t * sxt + h[:, None] * sxh + d[None, :] * sxd  # (BH, BD)
    x1 = tl.load(xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xo + half * sxd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    yo = y_ptr + b * syb + t * syt + h[:, None] * syh + d[None, :] * syd
    tl.store(yo, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(yo + half * syd, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope(q_ptr, k_ptr, cos_ptr, sin_ptr, yq_ptr, yk_ptr, T, HQ, HK, half,
          sqb, sqh, sqt, sqd, sqyb, sqyh, sqyt, sqyd, skb, skh, skt, skd, skyb, skyh, skyt, skyd, scb, sct, scd,
          BACKWARD: tl.constexpr, BHQ: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    # One program per (sequence, position) rotates all of its query and key heads: cos/sin read once, and
    # one launch for both tensors (an eager step pays ~20 µs of host time per launch).
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BD)
    dmask = d < half
    cbase = cos_ptr + b * scb + t * sct
    sbase = sin_ptr + b * scb + t * sct
    c1 = tl.load(cbase + d * scd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cbase + (d + half) * scd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sbase + d * scd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sbase + (d + half) * scd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rope_heads(q_ptr, yq_ptr, b, t, HQ, half, sqb, sqh, sqt, sqd, sqyb, sqyh, sqyt, sqyd, c1, c2, s1, s2,
                BACKWARD, BHQ, BD)  # fmt: skip
    _rope_heads(k_ptr, yk_ptr, b, t, HK, half, skb, skh, skt, skd, skyb, skyh, skyt, skyd, c1, c2, s1, s2,
                BACKWARD, BHK, BD)  # fmt: skip


def rope(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
         backward: bool) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """q (B, Hq, T, D) and k (B, Hk, T, D) with any strides (k may be None), cos/sin (B or 1, T, D) → the
    rotated (yq, yk), each like its input (layout kept)."""
    b, hq, t, d = q.shape
    yq = torch.empty_like(q)
    yk = None if k is None else torch.empty_like(k)
    hk = 0 if k is None else k.shape[1]
    cos, sin = cos.expand(b, t, d), sin.expand(b, t, d)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    k_args = (q, yq) if k is None else (k, yk)  # with no k, its heads are all masked out (HK = 0)
    _rope[(b * t,)](q, k_args[0], cos, sin, yq, k_args[1], t, hq, hk, d // 2, *q.stride(), *yq.stride(),
                    *k_args[0].stride(), *k_args[1].stride(), *cos.stride(), BACKWARD=backward,
                    BHQ=triton.next_power_of_2(hq), BHK=triton.next_power_of_2(max(hk, 1)),
                    BD=triton.next_power_of_2(d // 2))  # fmt: skip
    return yq, yk


@triton.jit
def _cross_entropy_rows(logits_ptr, labels_ptr, loss_ptr, scale_ptr, stride, n_cols, ignore_index,
                        WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # loss = logsumexp(x) − x[label]; d loss / dx = softmax(x) − onehot(label), times the reduction scale,
    # written over the logits row (it is not needed after this program).
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            cmask = cols < n_cols
            x = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(base + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=cmask)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                       write_grad: bool) -> torch.Tensor:  # fmt: skip
    """Per-row loss (M,) float32 of logits (M, V); with write_grad, logits becomes scale·(softmax − onehot)."""
    m, v = logits.shape
    loss = torch.empty(m, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(v), 4096)
    _cross_entropy_rows[(m,)](logits, labels, loss, scale, logits.stride(0), v, ignore_index, WRITE_GRAD=write_grad,
                              BLOCK=block, num_warps=8 if block >= 2048 else 4)  # fmt: skip
    return loss
