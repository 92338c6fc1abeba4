"""Compile lowbit's Triton kernels for an H100 (sm_90) on a machine without a GPU: front end, PTX and ptxas.

Run as a script (`python tests/kernels/cuda_compile.py`) by test_cuda_compile.py, in a process without
TRITON_INTERPRET (under the interpreter `@triton.jit` makes interpreted functions, which do not compile).
It catches what the interpreter cannot: code the compiler rejects (a non-bool `if` on a constexpr) and
inline PTX that ptxas rejects. Prints one line per kernel and the number of `prmt` and of
`lut4_asm.shared_dot_asm` table loads in each PTX.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowbit.kernels import adam8bit, lut4_gemm, lut4_gemv, lut4_gemv_half2, train_triton  # noqa: E402
from lowbit.kernels.lut4 import _device_table  # noqa: E402
from lowbit.kernels.lut4_asm import fp16_bits, lookup_asm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
LAYOUT = dict(GS=64, SCALES=1, PAIRED=True, HAS_ZP=False, DOUBLE_QUANT=True, NESTED_GS=256)
POINTERS = ["*u8", "*fp32", "*u8", "*fp32", "*fp32", "*fp32", "*fp32"]  # packed … offset (kernel_args order)


def compile_kernel(kernel, types: list[str], constexprs: dict, warps: int = 4, stages: int = 3):
    names = kernel.arg_names
    signature = dict(zip(names, types)) | {name: "constexpr" for name in constexprs}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(source, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def main() -> int:
    asm = lookup_asm(fp16_bits(_device_table("nf4", torch.device("cpu"))))
    cases = {
        "gemv bf16, register table": (lut4_gemv._lut4_gemv_kernel, ["*bf16", "*bf16", *POINTERS] + ["i32"] * 7,
                                      LAYOUT | dict(LUT_ASM=asm, BM=1, BN=8, BK=512)),
        "gemv fp32, memory table": (lut4_gemv._lut4_gemv_kernel, ["*fp32", "*fp32", *POINTERS] + ["i32"] * 7,
                                    LAYOUT | dict(LUT_ASM="", BM=1, BN=8, BK=512)),
        "gemv bf16 M=4": (lut4_gemv._lut4_gemv_kernel, ["*bf16", "*bf16", *POINTERS] + ["i32"] * 7,
                          LAYOUT | dict(LUT_ASM=asm, BM=4, BN=8, BK=256)),
        "dequantize to bf16": (lut4_gemm._lut4_dequant_kernel, ["*bf16", *POINTERS] + ["i32"] * 4,
                               LAYOUT | dict(LUT_ASM=asm, BN=16, BK=256, TILES=1)),
        "dequantize to bf16, 4 tiles a program": (lut4_gemm._lut4_dequant_kernel, ["*bf16", *POINTERS] + ["i32"] * 4,
                                                  LAYOUT | dict(LUT_ASM=asm, BN=16, BK=256, TILES=4)),
        "fused GEMM bf16": (lut4_gemm._lut4_gemm_kernel, ["*bf16", "*bf16", *POINTERS] + ["i32"] * 8,
                            LAYOUT | dict(LUT_ASM=asm, IEEE=False, BM=64, BN=64, BK=64, SWAP=True)),
        "8-bit AdamW step, bf16 parameters": (adam8bit._adamw8bit_kernel, ["*i64", "*i32", "*i32", "*fp32", "*fp32",
                                              "*fp32", "*i32", "*fp32", "*fp32", "*i32", "i32", "fp32", "fp32",
                                              "fp32", "fp32"],
                                              dict(P_DTYPE=triton.language.bfloat16, G_DTYPE=triton.language.bfloat16,
                                                   BLOCK=2048)),
    }  # fmt: skip
    # x pairs, 2^-e, group sums, y, packed, table words, pair words, nibble table, scale … offset;
    # M, N, K, KW, G, S, stride_ym, center
    half2 = ["*i32", "*fp32", "*fp32", "*bf16", "*u8", "*i32", "*i32", "*i32", *POINTERS[2:]] + ["i32"] * 7 + ["fp32"]
    for bm, zp, smem, copies in ((1, False, False, 32), (4, True, False, 32), (1, False, True, 32), (4, True, True, 32),
                                 (1, False, True, 16)):  # fmt: skip
        name = f"gemv half2 words, M={bm}" + (", zero points" if zp else "") + (", shared table" if smem else "")
        name += f" ({copies} copies)" if copies != 32 else ""
        cases[name] = (lut4_gemv_half2._half2_kernel, half2,
                       dict(GS=64, HAS_ZP=zp, DOUBLE_QUANT=not zp, NESTED_GS=256, PTX=True, BM=bm, BN=8, BK=512,
                            STAGES=1 if smem else 3, EVEN=not zp, SMEM=smem, AHEAD=smem, PDL=True,
                            COPIES=copies, SLICE=1024))  # fmt: skip
    cases["gemv half2, x to float16 pairs"] = (lut4_gemv_half2._prepare_x_kernel, ["*bf16", "*i32", "*fp32", "*fp32",
                                                                                    "i32", "i32", "i32", "i32", "i32"],
                                                dict(GS=128, SUMS=True, SLICE=1024, PDL=True))  # fmt: skip
    dropout_types = ["*bf16", "*bf16", "i32", "fp32", "fp32", "i64", "*i64"]  # x, y, n, p, scale, seed, seed_ptr
    cases["LoRA dropout, bf16"] = (train_triton._dropout, dropout_types, dict(BLOCK=1024, SEED_IN_MEMORY=False))
    cases["LoRA dropout, seed in memory"] = (train_triton._dropout, dropout_types,
                                             dict(BLOCK=1024, SEED_IN_MEMORY=True))  # fmt: skip
    cases["GeGLU forward, bf16"] = (train_triton._swiglu_fwd, ["*bf16"] * 3 + ["i64"], dict(BLOCK=1024, GELU=True))
    cases["GeGLU backward, bf16"] = (train_triton._swiglu_bwd, ["*bf16"] * 5 + ["i64"], dict(BLOCK=1024, GELU=True))
    # q, k, cos, sin, yq, yk; T, HQ, HK, half; 4 strides each of q, yq, k, yk; 3 of cos/sin
    cases["RoPE of q and k, bf16"] = (train_triton._rope, ["*bf16"] * 6 + ["i32"] * 4 + ["i64"] * 19,
                                      dict(BACKWARD=True, BHQ=32, BHK=8, BD=64))  # fmt: skip
    for name, (kernel, types, constexprs) in cases.items():
        compiled = compile_kernel(kernel, types, constexprs)
        ptx = compiled.asm["ptx"]
        print(f"{name}: {len(compiled.asm['cubin'])} bytes of sm_90 code, {ptx.count('prmt.b32')} prmt, "
              f"{ptx.count('ld.shared.b32 v')} table loads from shared memory")  # (the shared_dot_asm's)
    return 0


if __name__ == "__main__":
    sys.exit(main())
