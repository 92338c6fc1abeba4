"""One fused kernel launch for an 8-bit blockwise AdamW step of many tensors (`lowbit.optim.AdamW8bit` on CUDA).

The torch path of the optimizer runs ~20 kernels per tensor and step (decode two code tensors, the
update, two absmax reductions, two nearest-code searches, the casts) and materialises both moments in
fp32: on a GPU it ran at 0.3–0.5× torch AdamW's speed (bench/RESULTS.md). Here one program owns one
quantization block of one parameter and does the whole step in registers: it reads the parameter, its
gradient, the two 8-bit code blocks and their absmax, decodes the moments, applies the AdamW update,
writes the parameter, and re-quantizes both moments with the block's new absmax — the nearest code by
an 8-step binary search over the map's decision boundaries (the midpoints between sorted neighbours,
ties to the smaller value, exactly `formats.codebooks.nearest_code`'s rule). Per parameter it moves
the 2 bytes of codes (both ways) plus the parameter and gradient; nothing else touches memory.

One launch covers every tensor of a dtype (a LoRA model has hundreds of small ones, and a launch per
tensor would cost more host time than the update): a table holds each tensor's seven addresses and
size, and a per-block index says which tensor and which of its blocks a program updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
def _nearest(x, boundaries_ptr, codes_ptr, KEEP_POSITIVE: tl.constexpr):
    """Code of the nearest map value for each x: the number of boundaries strictly below x, as a code.
    KEEP_POSITIVE (an unsigned map, 0 in slot 0): a positive x gets at least slot 1, the smallest positive value."""
    slot = tl.zeros(x.shape, dtype=tl.int32)
    for step in tl.static_range(8):
        half = 128 >> step
        below = tl.load(boundaries_ptr + slot + (half - 1)) < x
        slot = tl.where(below, slot + half, slot)
    if KEEP_POSITIVE:
        slot = tl.where(x > 0, tl.maximum(slot, 1), slot)
    return tl.load(codes_ptr + slot)


@triton.jit
def _requantize(x, mask, code_ptr, absmax_ptr, offs, block, boundaries_ptr, codes_ptr, KEEP_POSITIVE: tl.constexpr):
    absmax = tl.max(tl.abs(x), axis=0)
    # the reciprocal, then a product, as the torch path does; the floor is an explicit float32 (Triton 3.6
    # types the literal 1e-38, subnormal in float32, as float64, which div_rn refuses)
    floor = tl.full(absmax.shape, 1e-38, tl.float32)
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, floor))
    scaled = tl.minimum(tl.maximum(x * inv, -1.0), 1.0)
    tl.store(code_ptr + offs, _nearest(scaled, boundaries_ptr, codes_ptr, KEEP_POSITIVE).to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + block, absmax)


@triton.jit
def _adamw8bit_kernel(table_ptr, block_tensor_ptr, block_first_ptr, scalars_ptr,
                      m_values_ptr, m_bounds_ptr, m_codes_ptr, v_values_ptr, v_bounds_ptr, v_codes_ptr,
                      block_size, beta1, beta2, eps, decay,
                      P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)  # this program's tensor …
    block = pid - tl.load(block_first_ptr + t)  # … and block of it
    row = table_ptr + t * 7  # parameter, gradient, m codes, v codes, m absmax, v absmax, size
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE), bitcast=True)
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE), bitcast=True)
    m_code_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8), bitcast=True)
    v_code_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8), bitcast=True)
    m_absmax_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32), bitcast=True)
    v_absmax_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32), bitcast=True)
    n = tl.load(row + 6)
    step_size, bias2_sqrt = tl.load(scalars_ptr + 2 * t), tl.load(scalars_ptr + 2 * t + 1)  # bias corrections

    lane = tl.arange(0, BLOCK)
    offs = block.to(tl.int64) * block_size + lane
    mask = (lane < block_size) & (offs < n)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_code = tl.load(m_code_ptr + offs, mask=mask, other=0).to(tl.int32)
    v_code = tl.load(v_code_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(m_values_ptr + m_code) * tl.load(m_absmax_ptr + block)
    v = tl.load(v_values_ptr + v_code) * tl.load(v_absmax_ptr + block)
    m = m * beta1 + (1.0 - beta1) * g
    v = v * beta2 + (1.0 - beta2) * g * g
    m = tl.where(mask, m, 0.0)  # lanes past the tensor count as zeros in the block's absmax
    v = tl.where(mask, v, 0.0)
    denom = tl.sqrt_rn(v) / bias2_sqrt + eps
    p = p * decay - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
    _requantize(m, mask, m_code_ptr, m_absmax_ptr, offs, block, m_bounds_ptr, m_codes_ptr, False)
    _requantize(v, mask, v_code_ptr, v_absmax_ptr, offs, block, v_bounds_ptr, v_codes_ptr, True)  # see AdamW8bit


TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_BLOCK_INDEX: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (sizes, block size, device) → tables


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on the device without waiting for the GPU: a copy from pageable memory would block
    the host until every queued kernel (the whole backward) has run; one from pinned memory does not."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


_TABLES: dict[tuple, torch.Tensor] = {}  # (rows, device) → the rows on the device


def _address_table(rows: tuple, device: torch.device) -> torch.Tensor:
    """The (tensors, 7) int64 address table on the device, cached (the same tensors give the same rows). A
    captured step must find it built, since a copy from pageable host memory cannot be captured: its
    tensors, gradients included, must keep the addresses an eager step gave them (`GraphedStep` zeroes the
    gradients in place for this optimizer)."""
    key = (rows, device)
    if key not in _TABLES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the 8-bit AdamW step was captured with parameters or gradients at addresses no "
                               "eager step used: warm up first, and zero gradients in place "
                               "(zero_grad(set_to_none=False)) so that they keep their addresses")  # fmt: skip
        if len(_TABLES) > 8:
            _TABLES.clear()
        _TABLES[key] = _to_device(torch.tensor(rows, dtype=torch.int64), device)
    return _TABLES[key]


def _block_index(sizes: tuple[int, ...], block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor of each program, first program of each tensor) for tensors of these sizes, cached."""
    key = (sizes, block_size, device)
    if key not in _BLOCK_INDEX:
        counts = torch.tensor([triton.cdiv(n, block_size) for n in sizes])
        first = torch.cumsum(counts, 0) - counts
        tensor_of = torch.repeat_interleave(torch.arange(len(sizes)), counts)
        if len(_BLOCK_INDEX) > 16:
            _BLOCK_INDEX.clear()
        _BLOCK_INDEX[key] = (tensor_of.to(device, torch.int32), first.to(device, torch.int32))
    return _BLOCK_INDEX[key]


def adamw8bit_step(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], signed: CodeSearch,
                   unsigned: CodeSearch, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   block_size: int) -> None:  # fmt: skip
    """One AdamW step of every parameter in place (one dtype, one device, contiguous), and of its moments in
    its state (AdamW8bit's codes and absmax, and ``step``: the step number after this update, ≥ 1: a number,
    or a device tensor, whose bias corrections are then computed on the device, as a CUDA graph needs)."""
    if not params:
        return
    dtype, grad_dtype, device = params[0].dtype, grads[0].dtype, params[0].device
    for p, g in zip(params, grads):
        if not p.is_contiguous() or not g.is_contiguous() or g.shape != p.shape:
            raise ValueError("adamw8bit_step takes contiguous parameters and contiguous gradients of their shapes")
        if (p.dtype, g.dtype, p.device) != (dtype, grad_dtype, device):
            raise ValueError("adamw8bit_step takes parameters (and gradients) of one dtype on one device")
    keys = ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax")
    rows = tuple((p.data_ptr(), g.data_ptr(), *(s[k].data_ptr() for k in keys), p.numel())
                 for p, g, s in zip(params, grads, states))  # fmt: skip
    table = _address_table(rows, device)
    if torch.is_tensor(states[0]["step"]):
        t = torch.stack([s["step"] for s in states]).double()
        scalars = torch.stack([lr / (1.0 - beta1**t), (1.0 - beta2**t).sqrt()], 1).float().reshape(-1)
    else:
        scalars = [x for s in states for x in (lr / (1.0 - beta1 ** s["step"]), (1.0 - beta2 ** s["step"]) ** 0.5)]
        scalars = _to_device(torch.tensor(scalars, dtype=torch.float32), device)
    tensor_of, first = _block_index(tuple(p.numel() for p in params), block_size, device)
    _adamw8bit_kernel[(tensor_of.numel(),)](
        table, tensor_of, first, scalars, signed.values, signed.boundaries, signed.codes, unsigned.values,
        unsigned.boundaries, unsigned.codes, block_size, beta1, beta2, eps, 1.0 - lr * weight_decay,
        P_DTYPE=TRITON_DTYPES[dtype], G_DTYPE=TRITON_DTYPES[grad_dtype], BLOCK=triton.next_power_of_2(block_size),
        num_warps=4 if block_size <= 1024 else 8,
    )  # fmt: skip
