"""DDP and FSDP2 on CPU with gloo, 2 processes: the same loss curve as 1 process with the same global batch,
a 4-bit base sharded across the processes, FSDP checkpoints that resume exactly, and a layout check that
stops every process when they hold different models."""

import pytest
import torch.distributed as dist

from tests.train._ddp_worker import RESUME_AT, STEPS, spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return spawn(1, str(out)), spawn(2, str(out))  # 1 process × 8 examples per step; 2 processes × 4


def test_ddp_and_fsdp_match_one_process(runs):
    one, two = runs
    for key in ("ddp-False", "fsdp-True"):  # DDP on an fp32 base, FSDP2 on a frozen NF4 base
        assert len(two[key]) == STEPS
        assert two[key] == pytest.approx(one[key], rel=1e-5), key


def test_fsdp_shards_the_4bit_base(runs):
    storage = runs[1]["storage"]
    assert len(storage) == 2
    total = storage[0]["total"]
    assert sum(s["local"] for s in storage) == total  # every byte on exactly one process, none replicated
    for s in storage:
        assert s["total"] == total and s["local"] <= s["bound"]  # at most FSDP2's padded chunk of each tensor
        assert 0.45 * total <= s["local"] <= 0.55 * total  # ~1/N of the packed codes and constants
        assert s["exact"] and s["weights_equal"]  # gathered back: the same bytes, the same dequantized weights


def test_adapter_saved_from_fsdp_reloads(runs):
    assert runs[1]["adapter_diff"] < 1e-5  # a fresh base + the saved adapter = the trained sharded model


def test_fsdp_checkpoint_resumes_exactly(runs):
    two = runs[1]
    assert len(two["resumed"]) == STEPS - RESUME_AT
    assert two["resumed"] == pytest.approx(two["straight"], rel=1e-6)
    assert two["resumed_weights_diff"] < 1e-6


def test_layout_mismatch_stops_every_process(runs):
    block = [m["block_size"] for m in runs[1]["mismatch"]]  # rank 1 quantized with block 32, through train()
    dtype = [m["dtype"] for m in runs[1]["mismatch"]]  # rank 1 holds one layer's codes as int8
    assert block[0] == block[1] and dtype[0] == dtype[1]  # every process raises, with the same message
    assert ("module 'model.layers.0.self_attn.q_proj.base_layer', format.block_size: 64 on rank 0, 32 on rank 1"
            in block[0])  # fmt: skip
    assert ("module 'model.layers.1.mlp.down_proj.base_layer', weight.dtype: torch.uint8 on rank 0, torch.int8 on "
            "rank 1" in dtype[0])  # fmt: skip
    for m in runs[1]["mismatch"]:  # 8-bit optimizer states are plain tensors: refused under FSDP, not a crash
        assert "does not run on FSDP-sharded parameters" in m["optimizer"]


def test_first_difference_names_the_module_and_field():
    import lowbit
    from lowbit.train.distributed import first_difference, layout_records
    from tests.tiny_models import tiny_llama

    a, b = tiny_llama(), tiny_llama()
    for model, double_quant in ((a, True), (b, False)):
        lowbit.quantize(model, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=double_quant))
    ra, rb = layout_records(a), layout_records(b)
    assert first_difference(ra, ra) is None
    assert first_difference(ra, rb, ("rank 0", "rank 1")) == (
        "module 'model.layers.0.self_attn.q_proj', format.double_quant: True on rank 0, False on rank 1")
    assert first_difference(ra, ra[:-4], ("rank 0", "rank 1")).endswith("exists only on rank 0")
