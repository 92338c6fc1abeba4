"""transformers "bnb 4-bit" checkpoints (bitsandbytes' Linear4bit layout), read and written without re-quantizing.

A model that transformers quantized with ``BitsAndBytesConfig(load_in_4bit=True)`` and saved with
``save_pretrained`` stores, for every quantized linear layer with prefix P:

    P.weight                                 packed 4-bit codes, uint8 of shape (numel/2, 1), high nibble first
    P.weight.absmax                          per-block scales: fp32, or uint8 codes with double quantization
    P.weight.quant_map                       the 16-entry codebook (NF4 or bitsandbytes' FP4)
    P.weight.nested_absmax / .nested_quant_map   double quantization: fp32 scales of the absmax blocks, 8-bit map
    P.weight.quant_state.bitsandbytes__nf4   uint8 bytes of a JSON object: quant_type, blocksize, dtype, shape,
                                             and with double quantization nested_blocksize, nested_dtype,
                                             nested_offset (the mean subtracted from the absmax constants)

and config.json carries ``quantization_config`` (``quant_method: "bitsandbytes"``, ``load_in_4bit: true``).
lowbit's NF4/FP4 storage is the same bytes (`lowbit.formats.blockwise`), so loading only renames tensors into
`QuantLinear` buffers and saving renames them back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.formats.codebooks import dynamic_codebook, get_codebook
from lowbit.formats.weight import WeightFormat
from lowbit.io.quantized import CheckpointError, _dedupe_shared, _parameters_on_meta
from lowbit.nn.quant_linear import QuantLinear
from lowbit.quantize.api import set_submodule
from lowbit.quantize.config import DTYPES, QuantConfig

STATE_KEY = ".weight.quant_state.bitsandbytes__"
BNB_CODEBOOKS = ("nf4", "fp4")  # lowbit's e2m1 (OCP FP4) is not bitsandbytes' FP4 table
NESTED_BLOCK_SIZE = 256


def is_bnb_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a transformers directory whose config says bitsandbytes quantization."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "bitsandbytes"


def load_bnb_4bit(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a transformers+bitsandbytes 4-bit checkpoint into a model with lowbit `QuantLinear` layers.

    The packed codes and scales are used as stored — nothing is dequantized or re-quantized. The model's
    ``lowbit_quant_config`` records the format, so `lowbit.save_quantized` can save it in lowbit's own layout.
    """
    path = Path(path)
    quant = _bnb_config(path)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    del config.quantization_config  # the lowbit model is not a bitsandbytes model
    model_cls = _model_class(config, path)
    state = _read_state(path)
    compute = quant.get("bnb_4bit_compute_dtype") or "float32"
    if compute not in DTYPES:
        raise CheckpointError(f"{path}: unsupported bnb_4bit_compute_dtype {compute!r}; expected one of {list(DTYPES)}")
    with _parameters_on_meta():
        model = model_cls(config)
    prefixes = sorted(key[: key.index(STATE_KEY)] for key in state if STATE_KEY in key)
    formats = set()
    for prefix in prefixes:
        fmt = _swap_in_layer(model, prefix, state, DTYPES[compute], path)
        formats.add((fmt.name, fmt.block_size, fmt.double_quant))
    _assign(model, state, path)
    if len(formats) == 1:
        name, block, dq = formats.pop()
        model.lowbit_quant_config = QuantConfig(format=name, block_size=block, double_quant=dq, compute_dtype=compute)
    return model.to(device).eval()


def _bnb_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a transformers model directory: config.json is missing")
    quant = json.loads(config_file.read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "bitsandbytes":
        raise CheckpointError(f"{path} is not a bitsandbytes checkpoint (config.json has no bitsandbytes "
                              "quantization_config)")  # fmt: skip
    if not quant.get("load_in_4bit", quant.get("_load_in_4bit")):
        raise CheckpointError(f"{path} is a bitsandbytes 8-bit checkpoint; lowbit reads the 4-bit layout only")
    return quant


def _model_class(config, path: Path):
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{path}: config.json names no transformers model class (architectures={names})")
    return cls


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():  # sharded: model-00001-of-0000N.safetensors, …
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        try:
            state.update(load_file(file))
        except Exception as e:  # safetensors raises several types for damaged files
            raise CheckpointError(f"{file} is corrupt or truncated ({e})") from e
    return state


def _swap_in_layer(model: nn.Module, prefix: str, state: dict, compute: torch.dtype, path: Path) -> WeightFormat:
    """Replace the linear layer ``prefix`` by a QuantLinear and rename its bnb tensors into the state dict."""
    (state_key,) = [k for k in state if k.startswith(prefix + STATE_KEY)]
    meta = json.loads(bytes(state.pop(state_key).tolist()).decode("utf-8"))
    quant_type, shape = meta.get("quant_type"), tuple(meta.get("shape") or ())
    if quant_type not in BNB_CODEBOOKS:
        raise CheckpointError(f"{path}: {prefix} has quant_type {quant_type!r}; expected one of {BNB_CODEBOOKS}")
    w = f"{prefix}.weight"
    nested = f"{w}.nested_absmax" in state
    _check_map(state.pop(f"{w}.quant_map"), get_codebook(quant_type), f"{prefix} quant_map", path)
    fmt = WeightFormat(quant_type, block_size=int(meta["blocksize"]), double_quant=nested)
    linear = model.get_submodule(prefix)
    if not isinstance(linear, nn.Linear) or shape != (linear.out_features, linear.in_features):
        raise CheckpointError(f"{path}: {prefix} holds a {shape} weight, but the model has {linear} there")
    storage = {"weight": state.pop(w).reshape(-1).view(torch.uint8), "absmax": state.pop(f"{w}.absmax")}
    if nested:
        if int(meta.get("nested_blocksize", NESTED_BLOCK_SIZE)) != NESTED_BLOCK_SIZE:
            size = meta["nested_blocksize"]
            raise CheckpointError(f"{path}: {prefix} has nested block size {size}; lowbit needs 256")
        _check_map(state.pop(f"{w}.nested_quant_map"), dynamic_codebook(), f"{prefix} nested_quant_map", path)
        storage["nested_absmax"] = state.pop(f"{w}.nested_absmax").float()
        storage["offset"] = torch.tensor([float(meta["nested_offset"])], dtype=torch.float32)
    else:
        storage["absmax"] = storage["absmax"].float()
    module = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, fmt, compute, device="meta")
    set_submodule(model, prefix, module)
    for name, tensor in storage.items():
        state[f"{w}_{name}" if name != "weight" else w] = tensor
    return fmt


def _check_map(stored: torch.Tensor, expected: torch.Tensor, what: str, path: Path) -> None:
    if stored.shape != expected.shape or not torch.allclose(stored.float(), expected.float(), atol=1e-6, rtol=0):
        raise CheckpointError(f"{path}: {what} is not the codebook lowbit knows for this format")


def _assign(model: nn.Module, state: dict, path: Path) -> None:
    expected = set(model.state_dict())
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in expected and "lm_head.weight" not in state:
        state["lm_head.weight"] = state[next(k for k in state if k.endswith("embed_tokens.weight"))]
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")  # fmt: skip
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: stored tensors do not fit the model: {e}") from e
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def bnb_state(module: QuantLinear) -> dict[str, torch.Tensor]:
    """The bitsandbytes tensors of one NF4/FP4 QuantLinear, keyed relative to the module ("weight", …)."""
    fmt = module.fmt
    if fmt.name not in BNB_CODEBOOKS:
        raise ValueError(f"bitsandbytes 4-bit stores nf4 or fp4 weights; this layer is {fmt.name}")
    storage = module.storage()
    meta = {"quant_type": fmt.name, "blocksize": fmt.block_size,
            "dtype": str(module.compute_dtype).removeprefix("torch."),
            "shape": [module.out_features, module.in_features]}  # fmt: skip
    out = {
        "weight": storage["weight"].reshape(-1, 1).contiguous(),
        "weight.absmax": storage["absmax"].contiguous(),
        "weight.quant_map": get_codebook(fmt.name).float().contiguous(),
    }
    if fmt.double_quant:
        meta |= {"nested_blocksize": NESTED_BLOCK_SIZE, "nested_dtype": "float32",
                 "nested_offset": float(storage["offset"].reshape(()).item())}  # fmt: skip
        out["weight.nested_absmax"] = storage["nested_absmax"].contiguous()
        out["weight.nested_quant_map"] = dynamic_codebook().float().contiguous()
    payload = json.dumps(meta).encode("utf-8")
    out[f"weight.quant_state.bitsandbytes__{fmt.name}"] = torch.tensor(list(payload), dtype=torch.uint8)
    return out


def save_bnb_4bit(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write a model whose quantized layers are NF4 or FP4 QuantLinear as a transformers+bitsandbytes checkpoint.

    ``AutoModelForCausalLM.from_pretrained(path)`` then loads it as Linear4bit layers (bitsandbytes installed),
    with the same bytes and therefore the same logits. One quant_type per model (bitsandbytes' config has one);
    linear layers left unquantized are listed in ``llm_int8_skip_modules``.
    """
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise ValueError("the model has no QuantLinear layers; quantize it (format nf4 or fp4) first")
    types = {m.fmt.name for m in quantized.values()}
    computes = {m.compute_dtype for m in quantized.values()}
    if len(types) != 1 or len(computes) != 1:
        raise ValueError(f"bitsandbytes' config holds one quant_type and compute dtype; the model mixes {types} and "
                         f"{computes}")  # fmt: skip
    tensors, _ = _dedupe_shared(model.state_dict())  # transformers re-ties shared weights on load
    for name, module in quantized.items():
        for key in [k for k in tensors if k.startswith(name + ".weight")]:
            del tensors[key]
        tensors |= {f"{name}.{k}": v for k, v in bnb_state(module).items()}
    skipped = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    (quant_type,), (compute,) = types, computes
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(model).__name__]  # as save_pretrained records it
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_compute_dtype": str(compute).removeprefix("torch."),
        "bnb_4bit_use_double_quant": any(m.fmt.double_quant for m in quantized.values()),
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skipped or None,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
