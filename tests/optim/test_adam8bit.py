"""8-bit blockwise AdamW against float64 AdamW written here, torch.optim.AdamW and bitsandbytes' AdamW8bit."""

import copy
import importlib.util
import math

import pytest
import torch

from lowbit.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit, optimizer_state_nbytes, unsigned_dynamic_codebook


def adamw_reference(p0, grads, lr, betas, eps, weight_decay):
    """Plain float64 AdamW (Loshchilov & Hutter 2019, Algorithm 2 with bias correction)."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * weight_decay * p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def run(opt_cls, p0, grads, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def test_unsigned_map_matches_bitsandbytes_and_its_definition():
    F = pytest.importorskip("bitsandbytes.functional")
    code = unsigned_dynamic_codebook()
    assert torch.equal(code, F.create_dynamic_map(signed=False))
    # Independent float64 check of the construction: decade e has 2^(e+1) midpoints of [0.1, 1]·10^(e-6).
    expected = [0.0, 1.0]
    for e in range(7):
        edges = [0.1 + 0.9 * i / 2 ** (e + 1) for i in range(2 ** (e + 1) + 1)]
        expected += [10.0 ** (e - 6) * (a + b) / 2 for a, b in zip(edges, edges[1:])]
    torch.testing.assert_close(code.double(), torch.tensor(sorted(expected), dtype=torch.float64), rtol=1e-6, atol=0)


def test_small_tensors_are_exact_fp32_adamw():
    torch.manual_seed(0)
    p0, grads = torch.randn(100), [torch.randn(100) for _ in range(10)]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    p, opt = run(AdamW8bit, p0, grads, **kw)  # 100 < min_8bit_size: fp32 moments
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(p.double(), adamw_reference(p0, grads, **kw), rtol=0, atol=1e-6)
    p_torch, _ = run(torch.optim.AdamW, p0, grads, **kw)
    torch.testing.assert_close(p, p_torch, rtol=0, atol=1e-6)


@pytest.mark.parametrize("block_size", [256, 2048])
def test_quantized_moments_track_float64_adamw(block_size):
    torch.manual_seed(1)
    n = 3 * block_size + 17  # a partial last block
    p0 = torch.randn(n)
    grads = [torch.randn(n) * (1 + 0.5 * math.sin(t)) for t in range(30)]
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    p, opt = run(AdamW8bit, p0, grads, block_size=block_size, min_8bit_size=0, **kw)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_codes"].shape == (n,)
    assert state["exp_avg_absmax"].shape == (math.ceil(n / block_size),)
    ref = adamw_reference(p0, grads, **kw)
    moved = (ref - p0.double()).abs()  # each coordinate moved up to 30·lr
    err = (p.double() - ref).abs()
    assert err.max() < 0.1 * 30 * kw["lr"]  # far below the distance travelled
    assert err.mean() < 0.05 * moved.mean()  # 8-bit moments: a few percent per coordinate


def test_matches_bitsandbytes_adamw8bit_on_cpu():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(2)
    n = 5000
    p0 = torch.randn(n)
    grads = [torch.randn(n) for _ in range(20)]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ours, opt = run(AdamW8bit, p0, grads, block_size=256, **kw)  # bitsandbytes ≥ 0.45 uses blocks of 256
    theirs, bopt = run(bnb.optim.AdamW8bit, p0, grads, **kw)
    ref = adamw_reference(p0, grads, **kw)
    s, b = opt.state[opt.param_groups[0]["params"][0]], bopt.state[bopt.param_groups[0]["params"][0]]
    torch.testing.assert_close(s["exp_avg_absmax"], b["absmax1"], rtol=1e-3, atol=0)
    torch.testing.assert_close(s["exp_avg_sq_absmax"], b["absmax2"], rtol=1e-3, atol=0)
    # bitsandbytes' CPU kernel rounds values far below a block's absmax (|x|/absmax < 1e-4) coarsely,
    # lowbit rounds every value to its nearest code; the rest agree code for code.
    assert (s["exp_avg_codes"] == b["state1"]).float().mean() > 0.98
    assert (s["exp_avg_sq_codes"] == b["state2"]).float().mean() > 0.95
    assert (ours - theirs).abs().max() < 0.5 * kw["lr"]
    # Both stay as close to exact AdamW as each other.
    e_ours, e_bnb = (ours.double() - ref).abs().mean(), (theirs.double() - ref).abs().mean()
    assert e_ours < 1.5 * e_bnb + 1e-6


def test_state_memory_is_a_quarter_of_adamw():
    params = [torch.nn.Parameter(torch.randn(64, 512)), torch.nn.Parameter(torch.randn(10))]
    opt8, opt32 = AdamW8bit(params, block_size=2048), torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt8.step()
    opt32.step()
    n_big = 64 * 512
    assert optimizer_state_nbytes(opt8) == 2 * n_big + 2 * 4 * (n_big // 2048) + 2 * 4 * 10
    assert optimizer_state_nbytes(opt32) == 8 * (n_big + 10)


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(3)
    p0, grads = torch.randn(6000), [torch.randn(6000) for _ in range(8)]
    straight, _ = run(AdamW8bit, p0, grads, lr=1e-2)
    p = torch.nn.Parameter(p0.clone())
    opt = AdamW8bit([p], lr=1e-2)
    for g in grads[:4]:
        p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    p2 = torch.nn.Parameter(p.detach().clone())
    opt2 = AdamW8bit([p2], lr=1e-2)
    opt2.load_state_dict(saved)
    for g in grads[4:]:
        p2.grad = g.clone()
        opt2.step()
    assert torch.equal(p2.detach(), straight)


def test_paged_optimizers_are_a_no_op_on_cpu():
    torch.manual_seed(4)
    p0, grads = torch.randn(5000), [torch.randn(5000) for _ in range(5)]
    a, _ = run(AdamW8bit, p0, grads, lr=1e-2)
    b, opt = run(PagedAdamW8bit, p0, grads, lr=1e-2)
    assert torch.equal(a, b) and opt.param_groups[0]["paged"]
    c, _ = run(torch.optim.AdamW, p0, grads, lr=1e-2, foreach=False)
    d, _ = run(PagedAdamW, p0, grads, lr=1e-2)
    assert torch.equal(c, d)


@pytest.mark.parametrize("kw", [dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=0.0), dict(weight_decay=-1.0),
                                dict(block_size=1), dict(block_size=True)])  # fmt: skip
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], **kw)


def _steps(p0, grads, backend, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = AdamW8bit([p], backend=backend, min_8bit_size=0, **kw)
    for g in grads:
        p.grad = g.clone().to(p.dtype)
        opt.step()
    return p.detach(), opt.state[p]


@pytest.mark.parametrize("block_size, n, dtype", [(256, 3 * 256 + 17, torch.float32), (2048, 5000, torch.float32),
                                                  (300, 1000, torch.bfloat16)])  # fmt: skip
def test_fused_step_matches_the_torch_step(block_size, n, dtype):
    """The Triton kernel (interpreted on the CPU) against the torch path: same parameters, same codes."""
    pytest.importorskip("triton")
    torch.manual_seed(5)
    p0 = torch.randn(n).to(dtype)
    grads = [torch.randn(n) * (1 + t) for t in range(6)]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, block_size=block_size)
    p_torch, s_torch = _steps(p0, grads, "torch", **kw)
    p_fused, s_fused = _steps(p0, grads, "triton", **kw)
    assert p_fused.dtype == dtype
    # (Triton's interpreter casts float32 to bfloat16 by truncation, the GPU rounds: up to an ulp a step.)
    rtol = 1e-6 if dtype == torch.float32 else len(grads) * 2**-7
    torch.testing.assert_close(p_fused.float(), p_torch.float(), rtol=rtol, atol=1e-7 if rtol < 1e-3 else 4e-3)
    for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        torch.testing.assert_close(s_fused[key], s_torch[key], rtol=1e-6, atol=0)
    for key in ("exp_avg_codes", "exp_avg_sq_codes"):  # a rounding tie may fall the other way, rarely
        assert (s_fused[key] == s_torch[key]).float().mean() > 0.999
        assert (s_fused[key].int() - s_torch[key].int()).abs().max() <= 1


def test_fused_and_torch_steps_share_one_state():
    """A run that switches backend halfway, through the state dict, continues like one that does not."""
    pytest.importorskip("triton")
    torch.manual_seed(6)
    p0, grads = torch.randn(4096 + 5), [torch.randn(4096 + 5) for _ in range(6)]
    straight, _ = _steps(p0, grads, "torch", lr=1e-2)
    p = torch.nn.Parameter(p0.clone())
    opt = AdamW8bit([p], backend="triton", min_8bit_size=0, lr=1e-2)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    opt2 = AdamW8bit([p], backend="torch", min_8bit_size=0, lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g in grads[3:]:
        p.grad = g.clone()
        opt2.step()
    torch.testing.assert_close(p.detach(), straight, rtol=1e-6, atol=1e-7)


def test_code_search_matches_nearest_code():
    from lowbit.formats.codebooks import dynamic_codebook, nearest_code
    from lowbit.kernels.adam8bit import CodeSearch

    for codebook in (dynamic_codebook(), unsigned_dynamic_codebook()):
        search = CodeSearch.from_map(codebook)
        x = torch.cat([torch.rand(20000) * 2 - 1, codebook, (codebook[1:] + codebook[:-1]) / 2])
        if codebook.min() >= 0:
            x = x.abs()
        slots = (search.boundaries[None, :] < x[:, None]).sum(1)  # the kernel's search, by counting
        assert torch.equal(search.codes[slots].long(), nearest_code(x, codebook))
        assert torch.equal(search.values, codebook)


def test_fused_step_updates_many_tensors_in_one_launch():
    """Tensors of several sizes and dtypes, one skipping steps (its bias correction lags), one too small for
    8-bit states: the one-launch-per-dtype kernel (interpreted) against the torch path, tensor by tensor."""
    pytest.importorskip("triton")
    from lowbit.kernels import adam8bit

    torch.manual_seed(7)
    shapes = [(64, 70), (3000,), (16, 256), (50,)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32]
    p0 = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]
    launches = []
    original = adam8bit.adamw8bit_step

    def counting(params, *args, **kw):
        launches.append(len(params))
        return original(params, *args, **kw)

    results = []
    for backend in ("triton", "torch"):
        params = [torch.nn.Parameter(p.clone()) for p in p0]
        opt = AdamW8bit(params, lr=1e-2, weight_decay=0.05, block_size=512, min_8bit_size=1000, backend=backend)
        adam8bit.adamw8bit_step = counting
        try:
            for step, gs in enumerate(grads):
                for i, (p, g) in enumerate(zip(params, gs)):
                    p.grad = None if (i == 1 and step % 2) else g.to(p.dtype)
                opt.step()
        finally:
            adam8bit.adamw8bit_step = original
        results.append((params, opt))
    # per step one launch for the fp32 tensors (two, or one on the steps tensor 1 skips) and one for the bf16;
    # the 50-value tensor keeps fp32 moments and the torch path
    assert launches == [2, 1, 1, 1] * 2 + [2, 1]
    (fused, opt_f), (plain, opt_t) = results
    for a, b, p0_ in zip(fused, plain, p0):
        rtol = 1e-6 if p0_.dtype == torch.float32 else 5 * 2**-7  # (the interpreter truncates to bf16)
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=rtol, atol=1e-7 if rtol < 1e-3 else 4e-3)
        assert opt_f.state[a]["step"] == opt_t.state[b]["step"]
    assert opt_f.state[fused[1]]["step"] == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_capturable_steps_match_host_steps(backend):
    """capturable=True keeps device step counters and computes the bias corrections from them (what a CUDA
    graph replays): the same updates as host counters, for 8-bit and fp32-moment tensors and a tensor that
    skips steps; its state then continues in an optimizer with host counters."""
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(8)
    shapes = [(64, 70), (3000,), (50,)]
    p0 = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]

    def train(capturable, steps):
        params = [torch.nn.Parameter(p.clone()) for p in p0]
        opt = AdamW8bit(params, lr=1e-2, weight_decay=0.05, block_size=512, min_8bit_size=1000, backend=backend,
                        capturable=capturable)  # fmt: skip
        for step, gs in enumerate(grads[:steps]):
            for i, (p, g) in enumerate(zip(params, gs)):
                p.grad = None if (i == 1 and step % 2) else g
            opt.step()
        return params, opt

    host, _ = train(False, 6)
    device, opt = train(True, 6)
    for a, b in zip(host, device):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)
    assert [opt.state[p]["step"].item() for p in device] == [6.0, 3.0, 6.0]
    assert all(torch.is_tensor(opt.state[p]["step"]) for p in device)
    # halfway: the device counters go on as host counters
    params, opt = train(True, 3)
    opt2 = AdamW8bit(params, lr=1e-2, weight_decay=0.05, block_size=512, min_8bit_size=1000, backend=backend)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step, gs in enumerate(grads[3:], start=3):
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = None if (i == 1 and step % 2) else g
        opt2.step()
    assert [opt2.state[p]["step"] for p in params] == [6, 3, 6]
    for a, b in zip(host, params):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)


def test_a_paged_optimizer_cannot_be_captured():
    with pytest.raises(ValueError, match="paged"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], paged=True, capturable=True)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"))])  # fmt: skip
def test_an_entry_with_tiny_gradients_does_not_explode(backend):
    """An entry whose gradients are 1e-5..1e-3 in a block of N(0, 1) ones: its v is below the smallest code of
    the block's map. Rounded to zero, the next step would divide its m by ε alone (measured before the fix:
    a step of ~170·lr); kept at the smallest positive code, it follows float64 AdamW within a few lr."""
    torch.manual_seed(7)
    n, tiny = 2048, 11
    p0 = torch.randn(n) * 0.02
    grads = []
    for t in range(25):
        g = torch.randn(n)
        g[tiny] = 1.7e-5 if t % 2 == 0 else 1.3e-3
        grads.append(g)
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    p, state = _steps(p0, grads, backend, block_size=2048, **kw)
    ref = adamw_reference(p0, grads, **kw)
    assert state["exp_avg_sq_codes"][tiny] != 0  # code 0 is the unsigned map's 0.0
    assert abs(p[tiny].item() - ref[tiny].item()) < 3 * kw["lr"]
    assert (p.double() - ref).abs().max() < 0.1 * 25 * kw["lr"]
