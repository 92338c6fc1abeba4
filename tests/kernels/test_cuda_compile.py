"""The CUDA kernels compile for sm_90 here, without a GPU (see cuda_compile.py): CI's only view of the
compiled path, which the Triton interpreter never takes (inline PTX, the compiler's own type rules)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton_spec = importlib.util.find_spec("triton")
ptxas = triton_spec and Path(triton_spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not (ptxas and ptxas.exists()), reason="Triton with its bundled ptxas is not installed")
def test_kernels_compile_for_sm90_with_the_register_lookup():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("cuda_compile.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines() if ": " in line)
    assert len(lines) == 18, run.stdout
    prmts = {name: int(rest.split(", ")[1].split()[0]) for name, rest in lines.items()}
    shared = {name: int(rest.split(", ")[2].split()[0]) for name, rest in lines.items() if "shared table" in name}
    assert len(shared) == 3 and min(shared.values()) > 0, shared  # the byte table in shared memory reached the PTX
    assert all(int(rest.split(", ")[2].split()[0]) == 0 for name, rest in lines.items() if name not in shared)
    for name in shared:  # (the register lookup's table words stay unused there)
        prmts.pop(name)
    assert prmts.pop("gemv fp32, memory table") == 0  # fp32 inputs keep the exact float32 table
    for name in ("8-bit AdamW step, bf16 parameters", "gemv half2, x to float16 pairs", "LoRA dropout, bf16",
                 "LoRA dropout, seed in memory", "RoPE of q and k, bf16", "GeGLU forward, bf16",
                 "GeGLU backward, bf16"):  # (no register table: that they compile is the check)
        prmts.pop(name)
    assert min(prmts.values()) > 0, prmts  # the register lookup reached every 16-bit kernel
