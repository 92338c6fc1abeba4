"""Quantization-aware LoRA merge: every target against a float64 reference written here, and the report's
numbers against an independent computation. References decode the storage tensors themselves (NF4 table,
int4 nibbles) and share no code with lowbit's formats, merge or GPTQ."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lowbit
from lowbit.evaluate import perplexity
from lowbit.peft import LoraConfig, LoraLinear, MergeConfig, apply_lora, lora_layers, merge_adapter
from tests.tiny_models import tiny_llama

NF4 = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0],
                   dtype=torch.float64)  # fmt: skip
NF4_CONFIG = lowbit.QuantConfig(format="nf4", block_size=64, double_quant=False)
INT4_CONFIG = lowbit.QuantConfig(format="int4", group_size=32, symmetric=False)
ALPHA, RANK = 8, 4
EVAL_IDS = torch.randint(0, 300, (400,), generator=torch.Generator().manual_seed(1))
CALIBRATION = torch.randint(0, 300, (6, 48), generator=torch.Generator().manual_seed(2))
QUIET = {"eval_windows": 0, "verbose": False}


class CharTokenizer:
    """A tokenizer in the shape `perplexity` and calibration call it: one id per character."""

    def __call__(self, text, return_tensors=None, verbose=True):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 300 for c in text]]))


def qlora_model(quant_config, targets="all-linear", seed=0):
    """(fp model, quantized model with a LoRA whose B is random: ‖ΔW‖ a few % of ‖W‖)."""
    fp = tiny_llama()
    model = copy.deepcopy(fp)
    lowbit.quantize(model, quant_config)
    apply_lora(model, LoraConfig(r=RANK, alpha=ALPHA, target_modules=targets, init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            b = layer.lora_B["default"]
            b.copy_(torch.randn(b.shape, generator=g) * 0.01)
    return fp, model


def delta64(layer: LoraLinear) -> torch.Tensor:
    return (ALPHA / RANK) * layer.lora_B["default"].detach().double() @ layer.lora_A["default"].detach().double()


def decode64(q) -> torch.Tensor:
    """The dense weight of a QuantLinear read straight from its storage (NF4 without DQ, or affine int4)."""
    out, inp = q.out_features, q.in_features
    packed = q.weight.reshape(-1)
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: out * inp].long()
    if q.fmt.name == "nf4":
        values = NF4[nibbles].view(-1, 64) * q.weight_absmax.double()[:, None]
        return values.reshape(out, inp)
    g = q.fmt.group_size
    levels = nibbles.view(out, inp // g, g).double()
    scale = q.weight_scale.double().view(out, inp // g, 1)
    zero = q.weight_zero_point.double().view(out, inp // g, 1)
    return (scale * (levels - zero)).reshape(out, inp)


def rtn64(w: torch.Tensor, fmt_name: str, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest in float64: NF4 blocks of 64 (absmax, or given per-block scales), affine int4 g32."""
    if fmt_name == "nf4":
        blocks = w.reshape(-1, 64)
        absmax = blocks.abs().amax(1, keepdim=True) if scales is None else scales
        idx = ((blocks / absmax)[..., None] - NF4).abs().argmin(-1)
        return (NF4[idx] * absmax).reshape(w.shape)
    groups = w.reshape(w.shape[0], -1, 32)
    rmin, rmax = groups.amin(-1, keepdim=True).clamp(max=0), groups.amax(-1, keepdim=True).clamp(min=0)
    scale = (rmax - rmin) / 15
    zero = torch.round(-rmin / scale)
    return (scale * ((torch.round(groups / scale) + zero).clamp(0, 15) - zero)).reshape(w.shape)


def bases_and_deltas(model):
    return {n: (layer.base_layer, delta64(layer)) for n, layer in lora_layers(model)}


def merged_weight(model, name) -> torch.Tensor:
    m = model.get_submodule(name)
    return (m.dequantize(torch.float64) if isinstance(m, lowbit.QuantLinear) else m.weight).double().detach()


@pytest.mark.parametrize("quant", [NF4_CONFIG, INT4_CONFIG], ids=["nf4", "int4-g32"])
def test_fp_target_is_fp_weight_plus_delta(quant):
    fp, model = qlora_model(quant, targets=("q_proj", "down_proj"))
    before = bases_and_deltas(model)
    report = merge_adapter(model, target="fp", fp_model=fp, **QUIET)
    for name, (_, delta) in before.items():
        want = fp.get_submodule(name).weight.double() + delta
        torch.testing.assert_close(merged_weight(model, name), want, rtol=1e-6, atol=1e-7)
    # Layers without LoRA get their full-precision weights back: nothing quantized is left.
    assert not any(isinstance(m, (lowbit.QuantLinear, LoraLinear)) for m in model.modules())
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, fp.model.layers[1].mlp.up_proj.weight)
    assert model.model.layers[1].mlp.up_proj.weight is not fp.model.layers[1].mlp.up_proj.weight
    assert not hasattr(model, "lowbit_quant_config") and not model.lowbit_adapters
    assert [r.name for r in report.layers] == list(before) and max(r.relative_error for r in report.layers) < 1e-6


@pytest.mark.parametrize("quant", [NF4_CONFIG, INT4_CONFIG], ids=["nf4", "int4-g32"])
def test_dequantized_target_is_dequantized_weight_plus_delta(quant):
    _, model = qlora_model(quant)
    before = bases_and_deltas(model)
    x = EVAL_IDS[None, :64]
    with torch.no_grad():
        adapter_on = model(x).logits
    merge_adapter(model, target="dequantized", **QUIET)
    for name, (base, delta) in before.items():
        torch.testing.assert_close(merged_weight(model, name), decode64(base) + delta, rtol=1e-6, atol=1e-7)
        assert type(model.get_submodule(name)) is nn.Linear
    with torch.no_grad():  # the dense model computes what the adapter-on model computed
        torch.testing.assert_close(model(x).logits, adapter_on, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", [NF4_CONFIG, INT4_CONFIG], ids=["nf4", "int4-g32"])
def test_rtn_requantized_target_rounds_the_merged_weight(quant):
    _, model = qlora_model(quant, targets=("v_proj", "up_proj"))
    before = bases_and_deltas(model)
    untouched = model.model.layers[0].mlp.down_proj
    merge_adapter(model, target="requantized", method="rtn", **QUIET)
    for name, (base, delta) in before.items():
        module = model.get_submodule(name)
        assert type(module) is lowbit.QuantLinear and module.fmt == base.fmt
        got, want = merged_weight(model, name), rtn64(decode64(base) + delta, quant.format)
        agree = torch.isclose(got, want, rtol=1e-5, atol=1e-7).double().mean()
        assert agree > 0.999, f"{name}: {agree:.5f} of the weights agree"  # float32 ties may round apart
    assert model.model.layers[0].mlp.down_proj is untouched  # layers without LoRA stay as they are
    assert model.lowbit_quant_config == quant


def block0_hessians(model, names):
    """2/N·XᵀX of each named adapter-on layer's inputs on CALIBRATION, in float64 (plain hooks)."""
    sums = {n: 0 for n in names}
    counts = dict.fromkeys(names, 0)
    hooks = []
    for n in names:
        def hook(mod, args, n=n):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[n] = sums[n] + x.t() @ x
            counts[n] += x.shape[0]
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in CALIBRATION:
            model(row[None])
    for h in hooks:
        h.remove()
    return {n: 2 * sums[n] / counts[n] for n in names}


def gptq64(w, h, quantize_column, damp=0.01):
    """GPTQ (Frantar et al. 2023, Alg. 1) in plain float64: U = chol(H⁻¹)ᵀ, one column at a time, no batching."""
    h = h.clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h)).t()
    w = w.clone()
    for i in range(w.shape[1]):
        q = quantize_column(i, w)
        e = (w[:, i] - q) / u[i, i]
        w[:, i:] -= torch.outer(e, u[i, i:])
        w[:, i] = q
    return w


def nf4_static_column(target):
    """NF4 with the block absmax of `target` held fixed (scales chosen before the sweep)."""
    scales = target.reshape(-1, 64).abs().amax(1, keepdim=True).expand(-1, 64).reshape(target.shape)

    def quantize(i, w):
        idx = ((w[:, i] / scales[:, i])[:, None] - NF4).abs().argmin(-1)
        return NF4[idx] * scales[:, i]

    return quantize


def int4_group_column():
    """Affine int4 with groups of 32, statistics fitted on the current columns when a group starts."""
    stats = {}

    def quantize(i, w):
        if i % 32 == 0:
            cols = w[:, i : i + 32]
            rmin, rmax = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            stats["scale"] = (rmax - rmin) / 15
            stats["zero"] = torch.round(-rmin / stats["scale"])
        scale, zero = stats["scale"], stats["zero"]
        return scale * ((torch.round(w[:, i] / scale) + zero).clamp(0, 15) - zero)

    return quantize


def objective(w_hat, w, h):
    d = w_hat - w
    return float(torch.trace(d @ h @ d.t()))


@pytest.mark.parametrize("quant", [NF4_CONFIG, INT4_CONFIG], ids=["nf4", "int4-g32"])
def test_gptq_requantized_target_matches_float64_gptq_on_the_merged_weight(quant):
    _, model = qlora_model(quant)
    names = [n for n, _ in lora_layers(model) if n.startswith("model.layers.0.")]
    before = bases_and_deltas(model)
    hessians = block0_hessians(model, names)  # the adapter-on model's inputs (block 0: nothing merged yet)
    merge_adapter(model, target="requantized", method="gptq", calibration=CALIBRATION,
                  n_samples=len(CALIBRATION), damp=0.01, **QUIET)  # fmt: skip
    for name in names:
        base, delta = before[name]
        target, h = decode64(base) + delta, hessians[name]
        column = nf4_static_column(target) if quant.format == "nf4" else int4_group_column()
        want = gptq64(target, h, column)
        got = merged_weight(model, name)
        assert type(model.get_submodule(name)) is lowbit.QuantLinear
        assert torch.isclose(got, want, rtol=1e-5, atol=1e-7).double().mean() > 0.98, name
        got_loss, want_loss = objective(got, target, h), objective(want, target, h)
        assert got_loss == pytest.approx(want_loss, rel=0.02), name
        assert got_loss < objective(rtn64(target, quant.format), target, h), name  # error feedback pays


def test_report_numbers_match_an_independent_computation(tmp_path):
    _, model = qlora_model(NF4_CONFIG)
    tokenizer, text = CharTokenizer(), "".join(chr(97 + int(i) % 26) for i in EVAL_IDS) * 2
    adapter_on = copy.deepcopy(model)
    before = bases_and_deltas(model)
    report = merge_adapter(model, target="requantized", method="rtn", tokenizer=tokenizer, eval_text=text,
                           eval_context=100, eval_windows=3, report_dir=tmp_path, verbose=False)  # fmt: skip
    for row in report.layers:
        base, delta = before[row.name]
        want = decode64(base) + delta
        assert row.relative_error == pytest.approx(float((merged_weight(model, row.name) - want).norm() / want.norm()),
                                                   rel=1e-6)  # fmt: skip
        assert row.delta_norm == pytest.approx(float(delta.norm() / decode64(base).norm()), rel=1e-6)
        assert (row.base, row.result) == ("nf4", "nf4")
    # KL(p ‖ q) over the same three windows of 100 tokens, from the two models' logits in float64.
    ids = tokenizer(text).input_ids[0]
    kl, nll_p, nll_q, n = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, 300, 100):
            w = ids[start : start + 100][None]
            lp = adapter_on(w).logits[0, :-1].double().log_softmax(-1)
            lq = model(w).logits[0, :-1].double().log_softmax(-1)
            kl += float((lp.exp() * (lp - lq)).sum())
            nll_p -= float(lp.gather(1, w[0, 1:, None]).sum())
            nll_q -= float(lq.gather(1, w[0, 1:, None]).sum())
            n += 99
    assert report.eval_tokens == n
    assert report.kl_divergence == pytest.approx(kl / n, rel=1e-3) and report.kl_divergence > 0
    assert report.perplexity_adapter == pytest.approx(math.exp(nll_p / n), rel=1e-5)
    assert report.perplexity_merged == pytest.approx(math.exp(nll_q / n), rel=1e-5)
    # … and it is the perplexity lowbit.evaluate reports with the same windows.
    ppl = perplexity(model, tokenizer, text, context_length=100, stride=100, max_windows=3)
    assert report.perplexity_merged == pytest.approx(ppl, rel=1e-5)
    saved = json.loads((tmp_path / "merge_report.json").read_text())
    assert saved["kl_divergence"] == report.kl_divergence and len(saved["layers"]) == len(report.layers)
    assert saved["config"]["target"] == "requantized" and saved["method"] == "rtn"
    markdown = (tmp_path / "merge_report.md").read_text()
    assert all(row.name in markdown for row in report.layers) and "KL" in markdown


def test_report_is_printed(capsys):
    _, model = qlora_model(INT4_CONFIG, targets=("o_proj",))
    merge_adapter(model, target="dequantized", eval_text=EVAL_IDS, eval_context=50, eval_windows=2)
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.o_proj" in out and "KL(adapter-on ‖ merged)" in out


def test_dense_base_layers_merge_plainly_for_every_target():
    model = tiny_llama()
    lowbit.quantize(model, lowbit.QuantConfig(format="nf4", include=("model.layers.0.*",)))
    apply_lora(model, LoraConfig(r=RANK, alpha=ALPHA, target_modules=("q_proj",), init_lora_weights=False))
    dense = model.model.layers[1].self_attn.q_proj
    want = dense.base_layer.weight.double() + delta64(dense)
    report = merge_adapter(model, target="requantized", method="gptq", calibration=CALIBRATION, **QUIET)
    torch.testing.assert_close(merged_weight(model, "model.layers.1.self_attn.q_proj"), want, rtol=1e-6, atol=1e-7)
    assert [r.base for r in report.layers] == ["nf4", "dense float32"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, lowbit.QuantLinear)


def test_refusals():
    _, model = qlora_model(NF4_CONFIG, targets=("q_proj",))
    with pytest.raises(ValueError, match="fp_model"):
        merge_adapter(model, target="fp", **QUIET)
    with pytest.raises(ValueError, match="calibration"):
        merge_adapter(model, target="requantized", method="gptq", **QUIET)
    with pytest.raises(ValueError, match="tokenizer"):
        merge_adapter(model, target="dequantized", eval_text="some text", verbose=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        merge_adapter(model, target="fp", fp_model=nn.Sequential(), **QUIET)
    assert lora_layers(model)  # a refused merge leaves the adapter on
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_adapter(tiny_llama(), **QUIET)
    for bad in ({"target": "int4"}, {"method": "awq"}, {"dtype": "int8"}, {"eval_windows": -1}, {"damp": 2.0},
                {"n_samples": 0}, {"version": 2}):  # fmt: skip
        with pytest.raises(ValueError):
            MergeConfig(**bad)
