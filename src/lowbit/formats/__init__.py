"""Number formats and quantized storage (codebooks, granular int/FP8 scaling, blockwise 4-bit + DQ)."""

from lowbit.formats.blockwise import (
    NestedState,
    QuantState,
    dequantize_4bit,
    dequantize_blockwise,
    pack_4bit,
    quantize_4bit,
    quantize_blockwise,
    unpack_4bit,
)
from lowbit.formats.codebooks import (
    bnb_fp4_codebook,
    dynamic_codebook,
    e2m1_codebook,
    get_codebook,
    nearest_code,
    nf4_codebook,
    nf4_from_quantiles,
    NF4_TABLE,
)
from lowbit.formats.granularity import Granularity, from_groups, n_groups, to_groups
from lowbit.formats.scaled import FP8_DTYPES, ScaledTensor, dequantize_scaled, int_range, quantize_fp8, quantize_int
from lowbit.formats.weight import FORMATS, WeightFormat
