"""Instructions per packed byte in the inner loop of the decode GEMVs, compiled for sm_90 without a GPU.

Triton compiles each kernel for an H100 (its bundled ptxas) with the specialisations a real launch gets
(every pointer 16-byte aligned, every size a multiple of 16), `nvdisasm` (also bundled) disassembles the
cubin, and the longest loop — the walk along K — is counted: instructions per iteration divided by the
packed bytes one thread handles per iteration. A GEMV that streams 4-bit weights is bound by instruction
issue when this count is high (bench/RESULTS.md); it is a property of the code, not a timing.

    python bench/sass_count.py            # a table: kernel, tile, instructions/iteration, per byte, load → use
                                          # distances, top opcodes
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).resolve().parents[1] / "tests")]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.cuda_compile import LAYOUT, POINTERS  # noqa: E402
from lowbit.kernels import lut4_gemv, lut4_gemv_half2  # noqa: E402
from lowbit.kernels.lut4 import _device_table  # noqa: E402
from lowbit.kernels.lut4_asm import fp16_bits, lookup_asm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"


def compile_aligned(kernel, types: list[str], constexprs: dict, aligned: list[str], warps: int, stages: int = 3):
    """Compile with the divisibility-by-16 specialisation a launch with aligned pointers and sizes gets."""
    names = kernel.arg_names
    signature = dict(zip(names, types)) | {name: "constexpr" for name in constexprs}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()})  # fmt: skip
    return triton.compile(source, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def loop_body(cubin: bytes) -> list[str]:
    """The instructions (predicate stripped) of the longest loop (a backward branch to a label) of a cubin's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(NVDISASM), "-c", f.name], capture_output=True, text=True, check=True).stdout
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]  # fmt: skip
    start, end = max(loops, key=lambda span: span[1] - span[0])
    body = [line for line in lines[start : end + 1] if re.match(r"\s*/\*[0-9a-f]+\*/", line)]
    return [re.sub(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?", "", line).strip() for line in body]


def inner_loop(cubin: bytes) -> list[str]:
    """The opcodes of the longest loop."""
    return [ins.split()[0] for ins in loop_body(cubin)]


def load_distances(cubin: bytes) -> list[int]:
    """For each global load in the loop, the instructions issued before the first one that reads its result
    (around the back edge): how much work can hide that load's latency before the warp waits for it."""
    body = loop_body(cubin)
    out = []
    for i, ins in enumerate(body):
        m = re.match(r"LDG\S*\s+(R\d+)", ins)
        if m:
            reads = re.compile(rf"\b{m.group(1)}\b")
            sources = [ins.split(" ", 1)[-1].split(",", 1)[-1] for ins in body]  # operands after the destination
            later = [d for d in range(1, len(body)) if reads.search(sources[(i + d) % len(body)])]
            out.append(later[0] if later else len(body))
    return out


def register_gemv(bn: int, bk: int, warps: int):
    asm = lookup_asm(fp16_bits(_device_table("nf4", torch.device("cpu"))))
    names = lut4_gemv._lut4_gemv_kernel.arg_names
    return compile_aligned(lut4_gemv._lut4_gemv_kernel, ["*bf16", "*bf16", *POINTERS] + ["i32"] * 7,
                           LAYOUT | dict(LUT_ASM=asm, BM=1, BN=bn, BK=bk), names[:9] + ["N", "K", "KB", "G",
                           "stride_xm", "stride_ym"], warps)  # fmt: skip


def half2_gemv(bn: int, bk: int, warps: int, bm: int = 1, stages: int = 1, smem: bool = False, ahead: bool = False,
               copies: int = 32):
    names = lut4_gemv_half2._half2_kernel.arg_names
    return compile_aligned(lut4_gemv_half2._half2_kernel,
                           ["*i32", "*fp32", "*fp32", "*bf16", "*u8", "*i32", "*i32", "*i32", *POINTERS[2:]]
                           + ["i32"] * 7 + ["fp32"],
                           dict(GS=64, HAS_ZP=False, DOUBLE_QUANT=True, NESTED_GS=256, PTX=True, BM=bm, BN=bn, BK=bk,
                                STAGES=stages, EVEN=True, SMEM=smem, AHEAD=ahead, PDL=True, COPIES=copies,
                                SLICE=1024),
                           names[:13] + ["N", "K", "KW", "G", "S", "stride_ym"], warps)  # fmt: skip


def main() -> None:
    print("| kernel | tile (BM×BN×BK, warps) | instructions / iteration | per packed byte (× rows of x) | "
          "load → first use (instructions) | top opcodes |")
    print("|---|---|---|---|---|---|")
    cases = [("register table (lut4_gemv)", 1, 16, 256, 4, lambda: register_gemv(16, 256, 4)),
             ("register table (lut4_gemv)", 1, 16, 512, 4, lambda: register_gemv(16, 512, 4)),
             ("half2 words (lut4_gemv_half2)", 1, 8, 512, 4, lambda: half2_gemv(8, 512, 4)),
             ("half2 words (lut4_gemv_half2)", 1, 8, 1024, 4, lambda: half2_gemv(8, 1024, 4)),
             ("half2 words (lut4_gemv_half2)", 1, 4, 1024, 1, lambda: half2_gemv(4, 1024, 1)),
             ("half2 words, pipelined (3 stages)", 1, 8, 512, 4, lambda: half2_gemv(8, 512, 4, stages=3)),
             ("half2 words, 4 rows of x", 4, 8, 256, 4, lambda: half2_gemv(8, 256, 4, bm=4)),
             ("half2 words, shared byte table", 1, 16, 1024, 4, lambda: half2_gemv(16, 1024, 4, smem=True)),
             ("half2 words, shared byte table", 1, 32, 512, 4, lambda: half2_gemv(32, 512, 4, smem=True)),
             ("half2 words, shared byte table, loads ahead", 1, 32, 512, 4,
              lambda: half2_gemv(32, 512, 4, smem=True, ahead=True))]  # fmt: skip
    for name, bm, bn, bk, warps, build in cases:
        cubin = build().asm["cubin"]
        ops = inner_loop(cubin)
        per_thread = bn * bk / 2 / (32 * warps)  # packed bytes a thread handles per iteration
        top = ", ".join(f"{op} {n}" for op, n in collections.Counter(ops).most_common(6))
        distances = ", ".join(map(str, load_distances(cubin)))
        print(f"| {name} | {bm}×{bn}×{bk}, {warps} | {len(ops)} | {len(ops) / per_thread:.1f} | {distances} | {top} |")


if __name__ == "__main__":
    main()
