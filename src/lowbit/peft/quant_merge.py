"""Merging a LoRA trained on a quantized base (QLoRA on NF4, LoRA on GPTQ/int4): where the result lands.

A LoRA trained over a quantized layer learned ΔW = Σ (alpha/r)·B·A (Hu et al. 2021, eq. 3) against the
dequantized weight dequant(Q) it saw in every forward pass. `merge_adapter` folds it in, and the user
picks the weight it lands on (`MergeConfig.target`):

- "fp": the original full-precision weights, W_fp + ΔW (needs the fp model: `fp_model=`, a module or a
  directory for `lowbit.load_model`). The adapter was trained to correct dequant(Q), not W_fp, so this is
  not exactly the adapter-on model; the report's KL says by how much. Layers without LoRA get W_fp back too.
- "dequantized": dense dequant(Q) + ΔW — computes what the adapter-on model computed (up to rounding),
  at full-precision size. Layers without LoRA are dequantized as well (a plain dense model).
- "requantized": quantize(dequant(Q) + ΔW) back into each base layer's own `WeightFormat`, the size of the
  quantized model. `method="rtn"` rounds to nearest: a ΔW smaller than half a quantization step mostly
  rounds back to Q, which silently drops much of the adapter (QLoRA's known merge problem).
  `method="gptq"` chooses the levels with GPTQ's error feedback (Frantar et al. 2023, eq. 3; for NF4/FP4
  with block scales fixed first, see `lowbit.quantize.gptq`): it minimises ‖X·(Ŵ − W)ᵀ‖² for the merged
  target W = dequant(Q) + ΔW, with the Hessian 2XᵀX/N of the layer's calibration inputs X in the
  adapter-on model. Calibration is sequential as in `lowbit.quantize`'s GPTQ: each block's inputs come
  from the blocks before it already merged, so later blocks also correct what earlier ones lost.

Every merge returns (prints, and with `report_dir` saves as JSON + Markdown) a `MergeReport`: per-layer
relative error against W_base + ΔW, and KL divergence + perplexity of the merged vs the adapter-on model
on fixed text (`lowbit.peft.merge_report`). The model is changed in place, as `merge_lora` does; the LoRA
modules are gone afterwards (peft's merge_and_unload), trained modules_to_save are kept.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from lowbit.formats.weight import INT_BITS
from lowbit.nn.quant_linear import QuantLinear
from lowbit.peft.lora import LoraLinear, _check_untied, _dense_or_requantized, _device_of, lora_layers, remove_lora
from lowbit.peft.merge_report import (
    MergeLayer,
    MergeReport,
    compare_next_token,
    eval_token_ids,
    next_token_reference,
    relative_error,
)
from lowbit.quantize.api import set_submodule
from lowbit.quantize.calibration import CalibrationConfig, HessianObserver, calibration_ids, calibration_steps
from lowbit.quantize.gptq import GPTQOptions, gptq_codebook_quantize, gptq_linear

CONFIG_VERSION = 1
TARGETS = ("fp", "dequantized", "requantized")
METHODS = ("rtn", "gptq")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class MergeConfig:
    """Where a LoRA merge lands and how it is checked (see the module docstring).

    target: "fp" | "dequantized" | "requantized".
    method: "rtn" | "gptq" — how requantized levels are chosen (ignored by the dense targets).
    dtype: dtype of dense merged weights ("float32", "bfloat16", "float16"); None keeps the fp weight's
        dtype ("fp") or the quantized layer's compute dtype ("dequantized").
    damp, act_order: GPTQ's dampening and act-order (int formats only); n_samples, seq_len, seed: how much
        calibration text GPTQ uses (`lowbit.quantize.CalibrationConfig`). damp is 0.1, not GPTQ's usual
        0.01: on SmolLM2 with little calibration text 0.01 overfit the 1536-wide down_proj (held-out error
        above plain rounding), 0.1 did not.
    eval_context, eval_windows: the KL / perplexity comparison runs on `eval_windows` non-overlapping
        windows of `eval_context` tokens from the start of the evaluation text; eval_windows=0 skips it.
    """

    target: str = "dequantized"
    method: str = "rtn"
    dtype: str | None = None
    damp: float = 0.1
    act_order: bool = False
    n_samples: int = 32
    seq_len: int = 256
    seed: int = 0
    eval_context: int = 256
    eval_windows: int = 4
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"MergeConfig version {self.version} is not supported "
                             f"(this lowbit reads {CONFIG_VERSION})")  # fmt: skip
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)} or None, got {self.dtype!r}")
        for name in ("eval_context", "eval_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "eval_context" else 0):
                raise ValueError(f"{name} must be an int ≥ {2 if name == 'eval_context' else 0}, got {value!r}")
        self.gptq_options, self.calibration_config  # validates them

    @property
    def gptq_options(self) -> GPTQOptions:
        return GPTQOptions(damp=self.damp, act_order=self.act_order)

    @property
    def calibration_config(self) -> CalibrationConfig:
        return CalibrationConfig(self.n_samples, self.seq_len, self.seed)

    @property
    def uses_gptq(self) -> bool:
        return self.target == "requantized" and self.method == "gptq"

    def to_dict(self) -> dict:
        return asdict(self)


def merge_adapter(model: nn.Module, config: MergeConfig | None = None, *, fp_model=None, calibration=None,
                  tokenizer=None, eval_text=None, report_dir: str | os.PathLike | None = None, verbose: bool = True,
                  **overrides) -> MergeReport:  # fmt: skip
    """Merge the active LoRA adapters of `model` into the weights `config.target` names, in place.

    `config` fields may also be given as keywords (`merge_adapter(model, target="requantized", method="gptq",
    calibration=texts, tokenizer=tok)`). fp_model: the full-precision model (module, or a path for
    `lowbit.load_model`) for target="fp". calibration: texts or token ids for method="gptq". eval_text: the
    text (or (N,) token ids) of the KL / perplexity comparison, default `lowbit.evaluate.reference_text()`.
    Prints the report unless `verbose=False`; writes merge_report.json / .md into `report_dir` if given.
    """
    config = replace(config or MergeConfig(), **overrides)
    start = time.perf_counter()
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    _check_untied(model, layers)
    fp_model = _fp_source(fp_model, config)
    _check_can_merge(model, layers, config, fp_model, calibration)
    was_training = model.training
    model.eval()  # LoRA dropout off: calibration and evaluation see the adapter as inference does
    reference = None
    if config.eval_windows:
        if eval_text is None:
            from lowbit.evaluate import reference_text

            eval_text = reference_text()
        ids = eval_token_ids(eval_text, tokenizer)
        reference = next_token_reference(model, ids, config.eval_context, config.eval_windows)
    if config.uses_gptq:
        rows = _merge_calibrated(model, dict(layers), config, fp_model, calibration, tokenizer)
    else:
        rows = [_swap_merged(model, name, layer, config, fp_model) for name, layer in layers]
    remove_lora(model, merge=True)  # no LoRA layer is left: this only settles modules_to_save and the records
    _finish_dense(model, config, fp_model)
    report = MergeReport(config.target, config.method if config.target == "requantized" else "none", rows,
                         config=config.to_dict())  # fmt: skip
    if reference is not None:
        (report.kl_divergence, report.perplexity_adapter, report.perplexity_merged,
         report.eval_tokens) = compare_next_token(model, reference)  # fmt: skip
    model.train(was_training)
    report.seconds = time.perf_counter() - start
    if verbose:
        print(report.to_markdown())
    if report_dir is not None:
        report.save(report_dir)
    return report


def _fp_source(fp_model, config: MergeConfig) -> nn.Module | None:
    if config.target != "fp":
        return None
    if fp_model is None:
        raise ValueError("target='fp' needs the full-precision weights: pass fp_model= (the original model, or "
                         "its directory for lowbit.load_model)")  # fmt: skip
    if isinstance(fp_model, (str, os.PathLike)):
        from lowbit.io.loading import load_model

        fp_model, _ = load_model(fp_model)
    return fp_model


def _check_can_merge(model: nn.Module, layers, config: MergeConfig, fp_model, calibration) -> None:
    """Refuse before any layer changes: a merge that fails half-way would leave a model that is neither."""
    if config.target == "fp":  # every quantized layer needs its full-precision twin
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                _fp_linear(fp_model, name.removesuffix(".base_layer"), module)
    if config.uses_gptq:
        if calibration is None:
            raise ValueError("method='gptq' needs calibration data: merge_adapter(model, …, calibration=texts, "
                             "tokenizer=tokenizer) (or token ids)")  # fmt: skip
        for name, layer in layers:
            fmt = getattr(layer.base_layer, "fmt", None)
            if fmt is not None and not (fmt.is_codebook or fmt.name in INT_BITS):
                raise ValueError(f"{name}: GPTQ chooses integer levels or 4-bit codes, not {fmt.name} values; "
                                 "requantize with method='rtn'")  # fmt: skip


def _fp_linear(fp_model: nn.Module, name: str, like: nn.Module) -> nn.Linear:
    """The full-precision twin of layer `name` (same shape) in `fp_model`."""
    try:
        fp = fp_model.get_submodule(name)
    except AttributeError:
        fp = None
    shape = (like.out_features, like.in_features)
    if not isinstance(fp, nn.Linear) or tuple(fp.weight.shape) != shape:
        raise ValueError(f"fp_model has no nn.Linear {name!r} of shape {shape} to take the full-precision weight from")
    return fp


def _describe(module: nn.Module) -> str:
    if isinstance(module, QuantLinear):
        fmt = module.fmt
        return fmt.name + (f"-g{fmt.group_size}" if fmt.name in INT_BITS and fmt.group_size else "")
    return f"dense {str(module.weight.dtype).removeprefix('torch.')}"


def _weight_of(module: nn.Module) -> torch.Tensor:
    return module.dequantize(torch.float32) if isinstance(module, QuantLinear) else module.weight.detach()


def _merged_layer(name: str, layer: LoraLinear, config: MergeConfig, fp_model: nn.Module | None,
                  hessian: torch.Tensor | None = None) -> tuple[nn.Module, MergeLayer]:  # fmt: skip
    """The merged replacement of one LoRA layer, and its report row."""
    base = layer.base_layer
    delta = sum((layer.delta_weight(n) for n in layer.active_adapters),
                torch.zeros(layer.out_features, layer.in_features))  # (out, in) fp32  # fmt: skip
    dtype = DTYPES[config.dtype] if config.dtype else None
    if not isinstance(base, QuantLinear):  # a dense base is already full precision: plain merge
        w_base, bias = base.weight.detach(), base.bias
        module = _dense(w_base.float() + delta.to(w_base.device), bias, dtype or w_base.dtype)
    elif config.target == "fp":
        fp = _fp_linear(fp_model, name, base)
        w_base = fp.weight.detach().to(_device_of(base))
        module = _dense(w_base.float() + delta.to(w_base.device), fp.bias, dtype or fp.weight.dtype)
    else:
        w_base = base.dequantize(torch.float32)
        w = w_base + delta.to(w_base.device)
        if config.target == "dequantized":
            module = _dense_or_requantized(base, w, "dense", dtype)
        elif config.method == "rtn":
            module = _dense_or_requantized(base, w, "requantize", None)
        else:
            module = _gptq_requantize(base, w, hessian, config)
    delta_norm, err = relative_error(_weight_of(module), w_base, delta)
    row = MergeLayer(name, (layer.out_features, layer.in_features), _describe(base), _describe(module), delta_norm, err)
    return module, row


def _dense(w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def _gptq_requantize(base: QuantLinear, w: torch.Tensor, hessian: torch.Tensor, config: MergeConfig) -> QuantLinear:
    """GPTQ's choice of `base.fmt` levels for the merged fp32 weight `w`, Hessian from calibration."""
    fmt, options = base.fmt, config.gptq_options
    target = _dense(w, base.bias, torch.float32)
    hessian = hessian.to(w.device)
    if fmt.is_codebook:
        storage, _ = gptq_codebook_quantize(w, hessian, fmt, options)
        module = QuantLinear.from_storage(target, storage, fmt, base.compute_dtype)
    elif fmt.name in INT_BITS:
        module = gptq_linear(target, hessian, fmt, options, base.compute_dtype)
    else:  # _check_can_merge refused it already
        raise ValueError(f"GPTQ cannot choose {fmt.name} values")
    if module.bias is not None:
        module.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)  # the bias is not requantized
    module.kernel = base.kernel  # keep the matmul path the user chose for this layer
    return module


def _swap_merged(model: nn.Module, name: str, layer: LoraLinear, config: MergeConfig, fp_model,
                 hessian: torch.Tensor | None = None) -> MergeLayer:  # fmt: skip
    with torch.no_grad():
        module, row = _merged_layer(name, layer, config, fp_model, hessian)
    set_submodule(model, name, module)
    return row


def _merge_calibrated(model: nn.Module, layers: dict[str, LoraLinear], config: MergeConfig, fp_model, calibration,
                      tokenizer) -> list[MergeLayer]:  # fmt: skip
    """GPTQ merge, block by block: observe each LoRA layer's inputs in the adapter-on block, then merge it.

    `calibration_steps` runs the next block on what this block computes once merged (GPTQ's sequential
    scheme). Layers over a dense base need no Hessian and are merged without being observed.
    """
    ids = calibration_ids(calibration, tokenizer, config.calibration_config, "GPTQ merge")
    quantized = [n for n, layer in layers.items() if isinstance(layer.base_layer, QuantLinear)]
    rows = {n: _swap_merged(model, n, layer, config, fp_model) for n, layer in layers.items() if n not in quantized}
    for step in calibration_steps(model, ids, quantized):
        modules = {n: model.get_submodule(n) for n in step.names}  # still the adapter-on LoraLinear layers
        observers = step.observe(modules, lambda n, m: HessianObserver(n, m.in_features, _device_of(m.base_layer)))
        for name, layer in modules.items():
            rows[name] = _swap_merged(model, name, layer, config, fp_model, observers.pop(name).hessian())
    return [rows[n] for n in layers]  # model order


def _finish_dense(model: nn.Module, config: MergeConfig, fp_model: nn.Module | None) -> None:
    """Dense targets: the quantized layers without LoRA become full precision / dequantized too."""
    if config.target == "requantized":
        return
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            if config.target == "fp":
                replacement = copy.deepcopy(_fp_linear(fp_model, name, module)).requires_grad_(False)
            else:
                from lowbit.io.merged import dequantize_linear  # lowbit.io imports lowbit.peft lazily: no cycle

                replacement = dequantize_linear(module, DTYPES[config.dtype] if config.dtype else None)
            set_submodule(model, name, replacement.to(_device_of(module)))
    if hasattr(model, "lowbit_quant_config"):  # nothing is quantized any more
        del model.lowbit_quant_config
