"""QAT (fake quant + straight-through estimator + conversion) and the distillation loss, against float64
references written here."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.formats import WeightFormat
from lowbit.train import DistillConfig, TrainConfig, distillation_loss, train
from lowbit.train.qat import FakeQuantLinear, QATConfig, apply_qat, convert_qat, fake_quantize
from tests.tiny_models import tiny_llama


def int4_row_reference(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 per output channel in float64: s = absmax/7, q = clamp(round(w/s), -7, 7), ŵ = s·q."""
    w = w.double()
    s = w.abs().amax(dim=1, keepdim=True) / 7
    return (torch.clamp(torch.round(w / s), -7, 7) * s).float()


def test_fake_quant_forward_is_the_format_and_backward_is_identity():
    torch.manual_seed(0)
    w = torch.randn(16, 32, requires_grad=True)
    fmt = WeightFormat("int4", group_size=None)
    q = fake_quantize(w, fmt)
    torch.testing.assert_close(q, int4_row_reference(w.detach()), rtol=0, atol=1e-6)
    g = torch.randn(16, 32)
    (q * g).sum().backward()
    assert torch.equal(w.grad, g)  # straight-through: ∂ŵ/∂w = 1


def test_fake_quant_linear_gradients_match_float64():
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 8)
    layer = FakeQuantLinear(lin, WeightFormat("int4", group_size=None))
    x = torch.randn(5, 32)
    y = layer(x)
    w_hat = int4_row_reference(lin.weight.detach()).double()
    torch.testing.assert_close(y.double(), x.double() @ w_hat.T + lin.bias.detach().double(), rtol=1e-5, atol=1e-5)
    g = torch.randn(5, 8)
    (y * g).sum().backward()
    torch.testing.assert_close(lin.weight.grad.double(), g.double().T @ x.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.bias.grad, g.sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [QATConfig("int4", group_size=32), QATConfig("int8"), QATConfig("nf4", block_size=64)])
def test_convert_gives_the_fake_quant_outputs(cfg):
    model = tiny_llama()
    apply_qat(model, cfg)
    assert isinstance(model.model.layers[0].mlp.down_proj, FakeQuantLinear)
    assert not isinstance(model.lm_head, FakeQuantLinear)
    with torch.no_grad():
        for m in model.modules():  # move the weights off their initial values, as training would
            if isinstance(m, FakeQuantLinear):
                m.linear.weight.add_(0.01 * torch.randn_like(m.linear.weight))
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        fake = model(input_ids=ids).logits
        convert_qat(model)
        real = model(input_ids=ids).logits
    assert isinstance(model.model.layers[0].mlp.down_proj, lowbit.QuantLinear)
    torch.testing.assert_close(real, fake, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        convert_qat(model)


def test_qat_beats_round_to_nearest_on_a_regression():
    """Fit y = x·Wᵀ with an int4 layer: training through fake quant finds better int4 weights than
    rounding the exact W (what post-training RTN does)."""
    torch.manual_seed(2)
    w_true = torch.randn(16, 64)
    x = torch.randn(512, 64) @ torch.randn(64, 64) * 0.3  # correlated inputs, where rounding errors add up
    y = x @ w_true.T
    fmt = WeightFormat("int4", group_size=None)
    rtn_error = F.mse_loss(x @ int4_row_reference(w_true).T, y).item()
    lin = torch.nn.Linear(64, 16, bias=False)
    lin.weight.data.copy_(w_true)
    layer = FakeQuantLinear(lin, fmt)
    opt = torch.optim.Adam(lin.parameters(), lr=3e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lowbit.train.lr_factor(step, 300, 0, "cosine"))
    for _ in range(300):
        opt.zero_grad()
        F.mse_loss(layer(x), y).backward()
        opt.step()
        schedule.step()
    qat_error = F.mse_loss(x @ fake_quantize(lin.weight, fmt).detach().T, y).item()
    assert qat_error < 0.85 * rtn_error  # 3.43 vs 4.69 here; 15-27% lower over seeds 0-3


def test_qat_config_validation():
    with pytest.raises(ValueError):
        QATConfig("int5")
    with pytest.raises(ValueError):
        QATConfig("int4", group_size=0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_qat(torch.nn.Sequential(torch.nn.ReLU()))


# ------------------------------------------------------------------------------------------ distillation
def distill_reference(s, t, y, temperature, alpha):
    """Per-position float64 loops: α·T²·Σ p log(p/q) + (1-α)·(-log softmax(s)[y]), mean over kept positions."""
    total, count = 0.0, 0
    for i in range(s.shape[0]):
        if y[i] == -100:
            continue
        p = torch.softmax(t[i].double() / temperature, -1)
        q = torch.softmax(s[i].double() / temperature, -1)
        kl = float((p * (p.log() - q.log())).sum())
        ce = -float(torch.log_softmax(s[i].double(), -1)[y[i]])
        total += alpha * temperature**2 * kl + (1 - alpha) * ce
        count += 1
    return total / count


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.7), (4.0, 1.0), (3.0, 0.0)])
def test_distillation_loss_float64(temperature, alpha):
    torch.manual_seed(3)
    s, t = torch.randn(10, 7) * 3, torch.randn(10, 7) * 3
    y = torch.randint(0, 7, (10,))
    y[[2, 5]] = -100
    cfg = DistillConfig(temperature=temperature, alpha=alpha)
    ours = distillation_loss(s, t, y, cfg)
    assert float(ours) == pytest.approx(distill_reference(s, t, y, temperature, alpha), rel=1e-5)
    # the soft term against torch's own KL (a peer), summed over kept positions
    keep = y != -100
    kl = F.kl_div(F.log_softmax(s[keep] / temperature, -1), F.log_softmax(t[keep] / temperature, -1),
                  log_target=True, reduction="sum") * temperature**2  # fmt: skip
    hard = F.cross_entropy(s[keep], y[keep], reduction="sum")
    assert float(distillation_loss(s, t, y, cfg, reduction="sum")) == pytest.approx(
        float(alpha * kl + (1 - alpha) * hard), rel=1e-5)  # fmt: skip


def test_distillation_loss_errors():
    with pytest.raises(ValueError):
        DistillConfig(temperature=0)
    with pytest.raises(ValueError):
        DistillConfig(alpha=1.5)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def test_trainer_distils_a_quantized_student_from_its_fp32_teacher():
    """QLoRA-distill on random token streams: alpha=0 is exactly plain training; alpha=1 lowers the KL."""
    teacher = tiny_llama()
    examples = [{"input_ids": (torch.arange(24) * (k + 3) % 300).tolist()} for k in range(16)]
    for e in examples:
        e["labels"] = list(e["input_ids"])

    def student():
        torch.manual_seed(0)  # the same LoRA initialisation every time
        s = copy.deepcopy(teacher)
        lowbit.quantize(s, lowbit.QuantConfig(format="int4", group_size=32))
        return lowbit.peft.apply_lora(s, lowbit.peft.LoraConfig(r=4, alpha=8))

    cfg = TrainConfig(max_steps=6, lr=1e-2, batch_size=4, progress=False, plot=False)
    plain = train(student(), examples, cfg, pad_token_id=0).losses
    hard_only = train(student(), examples, cfg, pad_token_id=0, teacher=teacher,
                      distill=DistillConfig(temperature=2.0, alpha=0.0)).losses  # fmt: skip
    assert hard_only == pytest.approx(plain, rel=1e-6)
    gentle = TrainConfig(max_steps=6, lr=1e-3, batch_size=4, schedule="constant", progress=False, plot=False)
    soft = train(student(), examples, gentle, pad_token_id=0, teacher=teacher, distill=DistillConfig(alpha=1.0)).losses
    assert soft[-1] < 0.7 * soft[0]  # the adapter learns to undo the int4 rounding (KL 1.3e-4 → 6e-5)
