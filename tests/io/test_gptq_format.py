"""GPTQ checkpoints: the published qweight/qzeros/scales/g_idx layout, checked by an independent float64 decoder.

The reference decoder below follows the layout as AutoGPTQ documents it (codes packed along the input rows of each
output column, least significant bits first; v1 zero points stored minus one) with Python integers, sharing no code
with lowbit's packer.
"""

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.io.gptq_format import gptq_layer_tensors, linear_from_gptq, load_gptq, save_gptq
from lowbit.nn import ActOrderQuantLinear, QuantLinear
from lowbit.quantize.gptq import GPTQOptions, gptq_linear
from tests.tiny_models import tiny_llama


def unpack_reference(words: torch.Tensor, bits: int, n: int) -> list[list[int]]:
    """(words, cols) int32 packed along dim 0 → codes[col][i] for i < n, via one big little-endian integer per col."""
    cols = []
    for c in range(words.shape[1]):
        stream = sum((int(w) & 0xFFFFFFFF) << (32 * k) for k, w in enumerate(words[:, c].tolist()))
        cols.append([(stream >> (bits * i)) & (2**bits - 1) for i in range(n)])
    return cols


def decode_reference(t: dict, bits: int, v1: bool) -> torch.Tensor:
    """W[o, i] = scales[g, o] · (code[i, o] − zero[g, o]),  g = g_idx[i], in float64."""
    in_f, out_f = t["qweight"].shape[0] * 32 // bits, t["qweight"].shape[1]
    codes = unpack_reference(t["qweight"], bits, in_f)  # [out][in]
    zeros = unpack_reference(t["qzeros"].t(), bits, out_f)  # qzeros is (G, out·b/32): pack dim is the last
    scales = t["scales"].double()
    w = torch.empty(out_f, in_f, dtype=torch.float64)
    for o in range(out_f):
        for i in range(in_f):
            g = int(t["g_idx"][i])
            zero = zeros[g][o] + (1 if v1 else 0)
            w[o, i] = scales[g, o] * (codes[o][i] - zero)
    return w


def quant_linear(bits: int, sym: bool, group: int | None, act_order: bool = False, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(64, 32, bias=True)
    fmt = lowbit.formats.WeightFormat(f"int{bits}", group_size=group, symmetric=sym)
    if not act_order:
        return QuantLinear.from_linear(linear, fmt)
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)  # uneven channels: a non-trivial act-order
    return gptq_linear(linear, 2 * x.t() @ x / 256, fmt, GPTQOptions(act_order=True))


def test_4bit_layout_nibbles():
    module = quant_linear(4, False, 16)
    t = gptq_layer_tensors(module, "gptq_v2")
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (64 * 4 // 32, 32)
    assert t["qzeros"].shape == (4, 32 * 4 // 32) and t["scales"].shape == (4, 32)
    assert t["scales"].dtype == torch.float16
    scale = module.weight_scale.view(32, 4).double().repeat_interleave(16, 1)  # (out, in): each value's scale
    zero = module.weight_zero_point.view(32, 4).double().repeat_interleave(16, 1)
    levels = torch.round(module.dequantize(torch.float64) / scale + zero)
    # input row 8i + j of output column o sits in bits 4j..4j+3 of qweight[i, o]
    for i, j, o in [(0, 0, 0), (0, 7, 3), (5, 2, 31), (7, 7, 17)]:
        assert (int(t["qweight"][i, o]) >> (4 * j)) & 0xF == int(levels[o, 8 * i + j])


@pytest.mark.parametrize("bits,sym,group,act_order,fmt", [
    (4, True, 16, False, "gptq"), (4, False, 16, False, "gptq_v2"), (4, True, 32, True, "gptq"),
    (4, False, None, False, "gptq_v2"), (8, True, 32, False, "gptq"), (8, False, 16, True, "gptq_v2"),
    (3, True, 32, False, "gptq"), (2, False, 16, False, "gptq_v2"),
])  # fmt: skip
def test_layer_matches_reference_decoder_and_round_trips(bits, sym, group, act_order, fmt):
    module = quant_linear(bits, sym, group, act_order)
    t = gptq_layer_tensors(module, fmt)
    reference = decode_reference(t, bits, v1=fmt == "gptq")
    loaded, state = linear_from_gptq(t, bits, group, sym, fmt, torch.float32)
    loaded.load_state_dict(state, assign=True)
    assert type(loaded) is (ActOrderQuantLinear if act_order and group else QuantLinear)
    assert torch.equal(loaded.dequantize(torch.float64), reference)  # fp16 scale × small int: exact in fp32
    # lowbit's own decode differs only by its fp32 → fp16 scale rounding
    torch.testing.assert_close(module.dequantize(torch.float64), reference, rtol=2**-10, atol=0)
    again = gptq_layer_tensors(loaded, fmt)
    assert all(torch.equal(t[k], again[k]) for k in t)
    assert loaded.fmt.symmetric == sym


def test_v1_refuses_zero_point_zero_and_v2_keeps_it():
    module = quant_linear(4, False, 16)
    with torch.no_grad():
        module.weight_zero_point[0] = 0  # a group without negative weights
    with pytest.raises(ValueError, match="gptq_v2"):
        gptq_layer_tensors(module, "gptq")
    t = gptq_layer_tensors(module, "gptq_v2")
    loaded, state = linear_from_gptq(t, 4, 16, False, "gptq_v2", torch.float32)
    loaded.load_state_dict(state, assign=True)
    assert torch.equal(loaded.weight_zero_point, module.weight_zero_point)


def test_symmetric_checkpoint_using_level_minus_8_reads_as_affine():
    module = quant_linear(4, True, 16)
    t = gptq_layer_tensors(module, "gptq")
    t["qweight"] = t["qweight"] & ~0xF  # input row 0 → code 0, i.e. level −8: outside lowbit's symmetric ±7
    loaded, state = linear_from_gptq(t, 4, 16, True, "gptq", torch.float32)
    loaded.load_state_dict(state, assign=True)
    assert not loaded.fmt.symmetric
    assert torch.equal(loaded.dequantize(torch.float64), decode_reference(t, 4, v1=True))


def test_model_checkpoint_round_trip(tmp_path):
    model = tiny_llama(tie=True)
    lowbit.quantize(model, lowbit.QuantConfig(format="int4", group_size=32))
    save_gptq(model, tmp_path / "a")
    quant = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert quant == json.loads((tmp_path / "a" / "quantize_config.json").read_text())
    assert {k: quant[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}
    loaded = load_gptq(tmp_path / "a")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tie restored
    save_gptq(loaded, tmp_path / "b")
    a = lowbit.io.bnb._read_state(tmp_path / "a")
    b = lowbit.io.bnb._read_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)


def test_refuses_codebook_layers(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4"))
    with pytest.raises(ValueError, match="nf4"):
        save_gptq(model, tmp_path)
