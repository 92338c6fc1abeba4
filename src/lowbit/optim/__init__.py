"""Memory-lean optimizers: 8-bit blockwise AdamW and paged (CPU-resident) optimizer states.

    opt = lowbit.optim.AdamW8bit(model.parameters(), lr=2e-4)          # 8-bit moments, blocks of 2048
    opt = lowbit.optim.PagedAdamW8bit(model.parameters(), lr=2e-4)     # + states in CPU RAM between steps
    lowbit.optim.optimizer_state_nbytes(opt)                           # bytes of optimizer state
"""

from lowbit.optim.adam8bit import AdamW8bit, PagedAdamW8bit, optimizer_state_nbytes, unsigned_dynamic_codebook
from lowbit.optim.paged import PagedAdamW, fetch_state, offload_state

__all__ = [
    "AdamW8bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "fetch_state",
    "offload_state",
    "optimizer_state_nbytes",
    "unsigned_dynamic_codebook",
]
