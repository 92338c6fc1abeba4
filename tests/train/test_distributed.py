"""DDP and FSDP2 on CPU with gloo, 2 processes: the same loss curve as 1 process with the same global batch."""

import pytest
import torch.distributed as dist

from tests.train._ddp_worker import spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def test_ddp_and_fsdp_match_one_process(tmp_path):
    one = spawn(1, str(tmp_path))  # 1 process × 8 examples per step
    two = spawn(2, str(tmp_path))  # 2 processes × 4 examples: DDP on an fp32 base, FSDP2 on a frozen NF4 base
    for key in ("ddp-False", "fsdp-True"):
        assert len(two[key]) == 5
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
