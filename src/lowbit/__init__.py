"""lowbit: quantize large language models and fine-tune them parameter-efficiently.

    import lowbit
    model, tokenizer = lowbit.load_model("smollm2-135m")
    report = lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=True))
    ppl = lowbit.evaluate.perplexity(model, tokenizer, text, context_length=512, stride=512)
    lowbit.save_quantized(model, "smollm2-nf4");  model = lowbit.load_quantized("smollm2-nf4")
    report = lowbit.merge_adapter(qlora_model, target="requantized", method="gptq", calibration=texts,
                                  tokenizer=tokenizer, report_dir="merge-report")   # or "fp", "dequantized"
"""

from lowbit import evaluate, formats, nn
from lowbit import generate, peft, prune
from lowbit.io.loading import load_model
from lowbit.io.quantized import CheckpointError, load_quantized, save_quantized
from lowbit.nn.quant_linear import QuantLinear
from lowbit.peft.quant_merge import MergeConfig, merge_adapter
from lowbit.quantize import QuantConfig, QuantReport, quantize

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "MergeConfig",
    "QuantConfig",
    "QuantLinear",
    "QuantReport",
    "evaluate",
    "formats",
    "generate",
    "load_model",
    "load_quantized",
    "merge_adapter",
    "nn",
    "peft",
    "prune",
    "quantize",
    "save_quantized",
]
