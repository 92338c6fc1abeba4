"""Kernel tests run Triton's interpreter on the CPU (TRITON_INTERPRET=1, small shapes).

The variable must be set before any @triton.jit function is created, i.e. before the kernel modules
are first imported, which may happen in any test module: tests/conftest.py sets it for the whole
suite; this one keeps `pytest tests/kernels` self-contained. Tests that need Triton skip (with the
reason) when it is not installed: `pip install 'lowbit[gpu]'` or `make test` brings it.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
