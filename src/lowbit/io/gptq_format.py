"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers-GPTQ layout), read and written without re-quantizing.

Every quantized linear layer with prefix P (in_features → out_features, b bits, G groups along the input) stores

    P.qweight   int32 (in·b/32, out)   codes packed along the input: the b-bit codes of input rows
                                       0, 1, 2, … of one output column form a little-endian bit stream, cut into
                                       32-bit words (4-bit: row 8i+j sits in bits 4j..4j+3 of word i; 3-bit words
                                       share codes across their boundaries, as AutoGPTQ's packer does)
    P.qzeros    int32 (G, out·b/32)    zero points, packed the same way along the output dimension
    P.scales    fp16  (G, out)
    P.g_idx     int32 (in,)            group of every input row: i // group_size, or any order with act-order
    P.bias      (out,)                 when the layer has one

and a weight decodes as  W[o, i] = scales[g, o] · (code[i, o] − zero[g, o]),  g = g_idx[i].

Zero points: two conventions exist. The original GPTQ/AutoGPTQ CUDA kernels ("v1", `checkpoint_format: "gptq"`,
what transformers, AutoGPTQ and exllama read) store zero − 1 and add the 1 back when unpacking; GPTQModel's "v2"
(`checkpoint_format: "gptq_v2"`) stores the zero as it is (its v1 → v2 loader adds 1 to every packed field). v1
cannot hold a zero point of 0 (its −1 has no b-bit pattern), which affine quantization produces for a group with no
negative weight; such a model must be written as v2. Symmetric GPTQ uses the zero point 2^(b−1) everywhere.

lowbit ↔ GPTQ, exactly: a symmetric int-b QuantLinear (levels ±(2^(b−1) − 1)) is code = level + 2^(b−1) with zero
2^(b−1); an affine one is code = level, zero = its zero point; an `ActOrderQuantLinear` (storage in act-order) gets
its columns put back in input order and g_idx[perm[i]] = i // group_size. Reading back inverts this, so codes, zero
points and g_idx round trip exactly; scales are written in fp16 (the layout's dtype), which rounds lowbit's fp32
scales (relative error ≤ 2^-11) — the one lossy step of lowbit → GPTQ; GPTQ → lowbit is exact. A GPTQ symmetric
checkpoint whose codes use the level −2^(b−1) (GPTQ's range is [0, 2^b − 1]) is read as affine with zero 2^(b−1).

The config travels as ``quantize_config.json`` (AutoGPTQ) and as ``quantization_config`` in config.json
(transformers): bits, group_size (−1 = one group per row), desc_act, sym, checkpoint_format.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from lowbit.formats.bitpack import pack_bits, unpack_bits
from lowbit.formats.blockwise import unpack_4bit
from lowbit.formats.scaled import ScaledTensor, int_range
from lowbit.formats.weight import INT_BITS, WeightFormat
from lowbit.io.bnb import _assign, _model_class, _read_state
from lowbit.io.quantized import CheckpointError, _dedupe_shared, _parameters_on_meta
from lowbit.nn.act_order_linear import ActOrderQuantLinear
from lowbit.nn.quant_linear import QuantLinear
from lowbit.quantize.api import set_submodule
from lowbit.quantize.config import DTYPES, QuantConfig

GPTQ_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # v1: zero − 1 stored; v2: zero stored as is
QUANTIZE_CONFIG = "quantize_config.json"
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")


# --- packing: b-bit codes along the last dimension into int32 words -----------------------------------------------


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) codes in [0, 2^bits) → (rows, n·bits/32) int32: each row a little-endian bit stream in words."""
    rows, n = codes.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} {bits}-bit codes do not fill whole 32-bit words (GPTQ needs n·bits % 32 == 0)")
    # pack_bits writes bit k of the stream to bit k % 8 of byte k // 8; each row fills whole words, so the bytes
    # of a row read as little-endian int32 are the row's words.
    stream = pack_bits(codes, bits).view(rows, n * bits // 8)
    return _as_int32_le(stream)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_int32`: (rows, words) int32 → (rows, n) uint8 codes."""
    rows = packed.shape[0]
    stream = _int32_le_bytes(packed.contiguous())  # (rows, words·4) uint8
    return unpack_bits(stream.reshape(-1), bits, rows * n).view(rows, n)


def _as_int32_le(stream: torch.Tensor) -> torch.Tensor:
    if sys.byteorder != "little":  # the view below reads bytes in machine order
        stream = stream.view(stream.shape[0], -1, 4).flip(-1).reshape(stream.shape)
    return stream.contiguous().view(torch.int32)


def _int32_le_bytes(words: torch.Tensor) -> torch.Tensor:
    stream = words.view(torch.uint8)
    if sys.byteorder != "little":
        stream = stream.view(words.shape[0], -1, 4).flip(-1).reshape(stream.shape)
    return stream


# --- one layer --------------------------------------------------------------------------------------------------


def _levels(module: QuantLinear) -> torch.Tensor:
    """The integer levels (out, in) int16 of an int-format QuantLinear, in its storage column order."""
    fmt, shape = module.fmt, (module.out_features, module.in_features)
    bits = INT_BITS[fmt.name]
    qmin, _ = int_range(bits, fmt.symmetric)
    data = module.storage()["weight"]
    if bits == 4:
        data = unpack_4bit(data, math.prod(shape)).to(torch.int16) + qmin
    elif bits < 4:
        data = unpack_bits(data, bits, math.prod(shape)).to(torch.int16) + qmin
    return data.to(torch.int16).view(shape)


def gptq_layer_tensors(module: QuantLinear, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The GPTQ tensors (qweight, qzeros, scales, g_idx, bias) of one int-format QuantLinear, keyed by leaf name."""
    fmt = module.fmt
    if fmt.name not in INT_BITS or INT_BITS[fmt.name] not in GPTQ_BITS:
        raise ValueError(f"GPTQ stores int{GPTQ_BITS} group-affine weights; this layer is {fmt.name}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    bits, (out_f, in_f) = INT_BITS[fmt.name], (module.out_features, module.in_features)
    group = fmt.group_size or in_f
    n_groups = math.ceil(in_f / group)
    storage = module.storage()
    levels = _levels(module)  # (out, in), stored column order
    scales = storage["scale"].view(out_f, n_groups).t()  # (G, out): lowbit keeps groups row-major
    if fmt.symmetric:
        half = 2 ** (bits - 1)
        codes, zeros = levels + half, torch.full((n_groups, out_f), half, dtype=torch.int16)
    else:
        codes, zeros = levels, storage["zero_point"].view(out_f, n_groups).t().to(torch.int16)
    g_idx = torch.arange(in_f, dtype=torch.int32) // group
    perm = getattr(module, "input_perm", None)
    if isinstance(module, ActOrderQuantLinear):
        perm = perm.long().cpu()
        original = torch.empty_like(codes)
        original[:, perm] = codes  # stored column i is input column perm[i]
        codes, g_idx = original, torch.empty_like(g_idx).index_put_((perm,), g_idx)
    if checkpoint_format == "gptq":
        if (zeros == 0).any():
            raise ValueError("a zero point of 0 (a group without negative weights) has no GPTQ v1 encoding "
                             "(v1 stores zero − 1); write checkpoint_format='gptq_v2'")  # fmt: skip
        zeros = zeros - 1
    tensors = {
        "qweight": pack_int32(codes.to(torch.int16), bits).t().contiguous(),  # (in·b/32, out)
        "qzeros": pack_int32(zeros, bits),  # (G, out·b/32)
        "scales": scales.to(torch.float16).contiguous(),  # (G, out)
        "g_idx": g_idx,
    }
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().contiguous()
    return tensors


def linear_from_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int | None, sym: bool,
                     checkpoint_format: str = "gptq", compute_dtype: torch.dtype = torch.float16,
                     device: str | torch.device = "meta") -> tuple[QuantLinear, dict[str, torch.Tensor]]:  # fmt: skip
    """(empty module on `device`, its state dict keyed by leaf name) holding one GPTQ layer's values exactly.

    `group_size` None (GPTQ's −1) means one group per row. The module is an `ActOrderQuantLinear` when g_idx is not
    the plain i // group_size: its storage then keeps each group's columns together, in ascending input order.
    """
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ bits must be one of {GPTQ_BITS}, got {bits}")
    qweight, qzeros, scales, g_idx = (tensors[k] for k in GPTQ_KEYS)
    in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
    group = group_size or in_f
    n_groups = math.ceil(in_f / group)
    if scales.shape != (n_groups, out_f) or g_idx.shape != (in_f,):
        raise ValueError(f"scales {tuple(scales.shape)} / g_idx {tuple(g_idx.shape)} do not fit a {in_f}→{out_f} "
                         f"layer with group size {group_size or -1}")  # fmt: skip
    codes = unpack_int32(qweight.t(), bits, in_f).to(torch.int16)  # (out, in), input order
    zeros = unpack_int32(qzeros, bits, out_f).to(torch.int16)  # (G, out)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    perm = _group_permutation(g_idx.long(), group)
    if perm is not None:
        codes = codes[:, perm]  # storage order: groups consecutive
    half = 2 ** (bits - 1)
    symmetric = sym and bool((zeros == half).all()) and bool((codes >= 1).all())
    fmt = WeightFormat(f"int{bits}", group_size=group_size, symmetric=symmetric)
    qmin, qmax = int_range(bits, symmetric)
    levels = codes - half if symmetric else codes
    if not symmetric and ((zeros < qmin) | (zeros > qmax)).any():
        raise ValueError(f"zero points outside [{qmin}, {qmax}]: is checkpoint_format {checkpoint_format!r} right?")
    dtype = torch.uint8 if not symmetric and bits == 8 else torch.int8
    q = ScaledTensor(levels.to(dtype), scales.t().float().reshape(-1), None if symmetric else zeros.t().reshape(-1),
                     "int", bits, fmt.granularity, torch.float32)  # fmt: skip
    state = fmt.encode_int(q)
    state = {("weight" if k == "weight" else f"weight_{k}"): v.contiguous() for k, v in state.items()}
    bias = tensors.get("bias")
    cls = ActOrderQuantLinear if perm is not None else QuantLinear
    module = cls(in_f, out_f, bias is not None, fmt, compute_dtype, device=device)
    if perm is not None:
        state["input_perm"] = perm.to(torch.int32)
    if bias is not None:
        state["bias"] = bias
    return module, state


def _group_permutation(g_idx: torch.Tensor, group: int) -> torch.Tensor | None:
    """None for the plain g_idx (i // group); else the stable sort that makes every group consecutive."""
    plain = torch.arange(g_idx.numel()) // group
    if torch.equal(g_idx, plain):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], plain):
        raise ValueError(f"g_idx does not give every group {group} rows; lowbit reads plain and act-order g_idx only")
    return perm


# --- whole checkpoints --------------------------------------------------------------------------------------------


def gptq_config(path: str | os.PathLike) -> dict | None:
    """The GPTQ quantization settings of a directory (config.json's quantization_config, else quantize_config.json)."""
    path = Path(path)
    config_file = path / "config.json"
    if config_file.is_file():
        quant = json.loads(config_file.read_text()).get("quantization_config") or {}
        if quant.get("quant_method") == "gptq":
            return quant
    if (path / QUANTIZE_CONFIG).is_file():
        return json.loads((path / QUANTIZE_CONFIG).read_text())
    return None


def is_gptq_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and gptq_config(path) is not None


def save_gptq(model: nn.Module, path: str | os.PathLike, tokenizer=None, checkpoint_format: str = "gptq") -> Path:
    """Write a model whose quantized layers are int2/3/4/8 QuantLinear as a GPTQ checkpoint directory.

    One bits / group size / symmetry for all layers (GPTQ's config holds one of each); desc_act is recorded when
    any layer is act-ordered. Linear layers left unquantized (lm_head) are stored as ordinary weights.
    """
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise ValueError("the model has no quantized layers; quantize it (format int4, …) first")
    wrong = sorted({m.fmt.name for m in quantized.values()} - {f"int{b}" for b in GPTQ_BITS})
    if wrong:
        raise ValueError(f"GPTQ stores int{'/'.join(map(str, GPTQ_BITS))} weights, the model has {wrong} layers")
    settings = {(m.fmt.name, m.fmt.group_size, m.fmt.symmetric, m.compute_dtype) for m in quantized.values()}
    if len(settings) != 1:
        raise ValueError(f"GPTQ's config holds one bits / group size / symmetry / dtype; the model mixes {settings}")
    ((name, group, sym, compute),) = settings
    tensors, _ = _dedupe_shared(model.state_dict())  # transformers re-ties shared weights on load
    for prefix, module in quantized.items():
        for key in [k for k in tensors if k.startswith(prefix + ".")]:
            del tensors[key]
        tensors |= {f"{prefix}.{k}": v for k, v in gptq_layer_tensors(module, checkpoint_format).items()}
    quant = {"quant_method": "gptq", "bits": INT_BITS[name], "group_size": group or -1,
             "desc_act": any(isinstance(m, ActOrderQuantLinear) for m in quantized.values()), "sym": sym,
             "true_sequential": True, "static_groups": False, "checkpoint_format": checkpoint_format}  # fmt: skip
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(compute).removeprefix("torch.")  # the GPTQ layers compute in the model's dtype
    config["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (path / QUANTIZE_CONFIG).write_text(json.dumps(quant, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_gptq(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a GPTQ checkpoint into a model with lowbit QuantLinear (ActOrderQuantLinear) layers, nothing requantized."""
    path = Path(path)
    quant = gptq_config(path)
    if quant is None:
        raise CheckpointError(f"{path} is not a GPTQ checkpoint (no gptq quantization_config or {QUANTIZE_CONFIG})")
    bits, group = int(quant.get("bits", 4)), int(quant.get("group_size", 128))
    fmt = quant.get("checkpoint_format", "gptq")
    if fmt not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"{path}: checkpoint_format {fmt!r} is not one lowbit reads ({CHECKPOINT_FORMATS})")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the lowbit model is not a transformers-GPTQ model
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float16")
    compute = DTYPES.get(name.removeprefix("torch."), torch.float16)
    state = _read_state(path)
    with _parameters_on_meta():
        model = _model_class(config, path)(config)
    for prefix in sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight")):
        layer = {k: state.pop(f"{prefix}.{k}") for k in (*GPTQ_KEYS, "bias") if f"{prefix}.{k}" in state}
        try:
            module, layer_state = linear_from_gptq(layer, bits, None if group == -1 else group,
                                                   bool(quant.get("sym", True)), fmt, compute)  # fmt: skip
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: layer {prefix}: {e}") from e
        set_submodule(model, prefix, module)
        state |= {f"{prefix}.{k}": v for k, v in layer_state.items()}
    _assign(model, state, path)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    model.lowbit_quant_config = QuantConfig(
        method="gptq", format=f"int{bits}", group_size=None if group == -1 else group,
        symmetric=all(m.fmt.symmetric for m in layers), compute_dtype=str(compute).removeprefix("torch."),
    )  # fmt: skip
    return model.to(device).eval()
