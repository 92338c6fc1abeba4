"""int8 × int8 GEMM with the row/column scales fused in, for W8A8 (LLM.int8(), SmoothQuant).

    y[m, n] = a_scale[m] · b_scale[n] · Σ_k a[m, k] · b[n, k]          a: (M, K) int8, b: (N, K) int8

The int8 products are summed exactly in int32 on the tensor cores (Hopper's wgmma s8 path, twice the
bf16 rate), then scaled once per output in float32: the symmetric per-token × per-channel
factorisation of LLM.int8() (Dettmers et al. 2022, eq. 2 without the outlier part) and SmoothQuant
(Xiao et al. 2023, W8A8 with per-token dynamic activation scales). Fusing the scales saves the
round trip of an int32 (M, N) matrix through memory that `torch._int_mm` followed by a multiply costs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.autotune import autotune
from lowbit.kernels.ops import check_int8_operands


@triton.jit
def _int8_mm_kernel(a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, y_ptr, M, N, K, stride_am, stride_bn, stride_ym, M_BUCKET,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    n_tiles_m, n_tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * n_tiles_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    ms = pid_m * BM + tl.arange(0, BM)
    ns = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        ks = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BK), BK), BK)
        a = tl.load(a_ptr + ms[:, None] * stride_am + ks[None, :], mask=(ms < M)[:, None] & (ks < K)[None, :], other=0)
        b = tl.load(b_ptr + ns[:, None] * stride_bn + ks[None, :], mask=(ns < N)[:, None] & (ks < K)[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)  # exact: |Σ| ≤ K·127² < 2³¹ for K < 133 000
    sa = tl.load(a_scale_ptr + ms, mask=ms < M, other=0.0)
    sb = tl.load(b_scale_ptr + ns, mask=ns < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    tl.store(y_ptr + ms[:, None] * stride_ym + ns[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(ms < M)[:, None] & (ns < N)[None, :])  # fmt: skip


def _config(bm, bn, bk, warps, stages) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)


_int8_mm_tuned = autotune([_config(128, 128, 128, 8, 3), _config(128, 256, 128, 8, 3), _config(64, 128, 128, 4, 4),
                           _config(16, 64, 256, 4, 3), _config(32, 128, 128, 4, 3)],
                          ["M_BUCKET", "N", "K"])(_int8_mm_kernel)  # fmt: skip


def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """Triton launch of y = (a · bᵀ) ⊙ (a_scale ⊗ b_scale); `config=None` autotunes (CUDA)."""
    check_int8_operands(a, b, a_scale, b_scale)
    a, b = a.contiguous(), b.contiguous()
    a_scale, b_scale = a_scale.float().contiguous(), b_scale.float().contiguous()
    m, k = a.shape
    n = b.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=a.device)
    args = (a, b, a_scale, b_scale, y, m, n, k, a.stride(0), b.stride(0), y.stride(0), triton.next_power_of_2(m))
    if config is None:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
        _int8_mm_tuned[grid](*args, GROUP_M=8)
    else:
        grid = (triton.cdiv(m, config["BM"]) * triton.cdiv(n, config["BN"]),)
        _int8_mm_kernel[grid](*args, GROUP_M=8, **config)
    return y
