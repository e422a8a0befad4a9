"""INT8 linear layer: exact forward/backward against its dequantized weight, unbiased fp32
stochastic rounding, conversion and back, checkpoints, device/dtype moves, the optimizer contract."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lowmem_optim import GaLoreAdamW, layerwise, lowrank_param_groups
from lowmem_optim.quant import int8_linear
from lowmem_optim.quant.int8_linear import (
    Int8Linear,
    Int8Weight,
    dequantize_linear_layers,
    quantize_linear_layers,
)
from tests.helpers.gloo import run_rank


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 48)
        self.up = nn.Linear(48, 96)
        self.down = nn.Linear(96, 48, bias=False)
        self.lm_head = nn.Linear(48, 32, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.lm_head(h + self.down(torch.relu(self.up(h))))


def loss_of(model: nn.Module, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(seed))
    return nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 32), tokens[:, 1:].reshape(-1))


def test_forward_and_gradients_equal_a_linear_layer_with_the_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    layer = Int8Linear.from_linear(linear, group_size=64)
    ref = nn.Linear(40, 24)
    with torch.no_grad():
        ref.weight.copy_(layer.weight.dequantized())
        ref.bias.copy_(linear.bias)
    x = torch.randn(3, 5, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = layer(x), ref(x_ref)
    torch.testing.assert_close(out, out_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)
    # the round-to-nearest conversion is within half a quantization step
    steps = layer.weight_scale.repeat_interleave(64)[: 40 * 24].view(24, 40)
    assert bool(((ref.weight - linear.weight).abs() <= 0.5 * steps + 1e-6).all())


def test_weight_is_stored_in_int8_with_no_full_precision_copy():
    layer = Int8Linear.from_linear(nn.Linear(512, 256))
    assert isinstance(layer.weight, Int8Weight) and layer.weight.shape == (256, 512)
    assert layer.weight.untyped_storage().nbytes() == layer.weight.element_size()  # one element
    assert layer.weight_codes.dtype == torch.uint8 and layer.weight_codes.shape == (256, 512)
    assert layer.weight_scale.shape == (512,) and layer.weight_scale.dtype == torch.float32
    assert set(layer.state_dict()) == {"weight_codes", "weight_scale", "weight_zero", "bias"}


def _on_grid_layer() -> tuple[Int8Linear, torch.Tensor, torch.Tensor]:
    """A layer, its dequantized weight, and the mask of values that are not a group's min/max."""
    layer = Int8Linear.from_linear(nn.Linear(256, 64, bias=False))
    w = layer.weight.dequantized(torch.float32)
    groups = w.view(-1, 256)
    interior = (groups > groups.amin(1, keepdim=True)) & (groups < groups.amax(1, keepdim=True))
    return layer, w, interior.view_as(w)


@pytest.mark.parametrize("fraction", [0.1, 0.02])
def test_stochastic_rounding_of_a_sub_step_update_is_unbiased_in_fp32(fraction):
    # extremes stay put, so the grid (scale, zero) is unchanged and the update is pure rounding
    layer, w0, interior = _on_grid_layer()
    step = layer.weight_scale.repeat_interleave(256).view_as(w0)
    moved = []
    for seed in range(8):
        trial = copy.deepcopy(layer)
        trial.weight.apply_update(-fraction * step * interior, seed=seed)
        moved.append(((trial.weight.dequantized(torch.float32) - w0) / step)[interior])
    moved = torch.cat(moved)
    # mean of 8 x ~16k independent roundings: standard error <= 0.5 / sqrt(n) ~ 0.0014
    assert abs(float(moved.mean()) - fraction) < 0.01
    assert set(torch.round(moved).unique().tolist()) <= {0.0, 1.0}


def test_deterministic_rounding_loses_sub_step_updates():
    layer, w0, interior = _on_grid_layer()
    layer.stochastic_round = False
    layer._link()
    codes = layer.weight_codes.clone()
    step = layer.weight_scale.repeat_interleave(256).view_as(w0)
    for seed in range(5):
        layer.weight.apply_update(-0.4 * step * interior, seed=seed)
    assert torch.equal(layer.weight_codes, codes)  # documented failure: every update vanished
    torch.testing.assert_close(layer.weight.dequantized(torch.float32), w0)


def test_apply_update_is_decay_then_step_in_fp32_within_rounding():
    torch.manual_seed(1)
    layer = Int8Linear.from_linear(nn.Linear(300, 20), group_size=128)  # last group partial
    w0 = layer.weight.dequantized(torch.float32)
    update = torch.randn(20, 300) * 0.05
    layer.weight.apply_update(update, alpha=0.5, decay=0.9, seed=3)
    expected = 0.9 * w0 - 0.5 * update
    steps = layer.weight_scale.repeat_interleave(128)[:6000].view(20, 300)
    error = (layer.weight.dequantized(torch.float32) - expected).abs()
    assert bool((error <= steps + 1e-6).all())  # stochastic rounding moves a value by < 1 step


def test_apply_update_draws_do_not_depend_on_the_chunking(monkeypatch):
    torch.manual_seed(2)
    layer = Int8Linear.from_linear(nn.Linear(300, 20), group_size=128)  # 47 groups, the last partial
    update = torch.randn(20, 300) * 0.05
    whole = copy.deepcopy(layer)
    whole.weight.apply_update(update, alpha=0.5, decay=0.9, seed=3)
    monkeypatch.setattr(int8_linear, "UPDATE_CHUNK", 3 * 128)  # 16 passes instead of 1
    layer.weight.apply_update(update, alpha=0.5, decay=0.9, seed=3)
    for key in ("weight_codes", "weight_scale", "weight_zero"):
        assert torch.equal(getattr(layer, key), getattr(whole, key))


def test_an_optimizer_step_gives_an_int8_weight_the_float_weights_step_with_its_scale_and_decay():
    """GaLore (scale 0.5, weight decay 0.5) on an INT8 weight and on its dequantized float copy, the
    same gradient: the INT8 weight lands within the one quantization step stochastic rounding may
    move a value, while the step itself moves values by several steps."""
    torch.manual_seed(4)
    layer = Int8Linear.from_linear(nn.Linear(48, 32, bias=False), group_size=64)
    w0 = layer.weight.dequantized(torch.float32)
    dense = nn.Parameter(w0.clone())
    grad = torch.randn(32, 48, generator=torch.Generator().manual_seed(5))
    for weight in (layer.weight, dense):
        opt = GaLoreAdamW([{"params": [weight], "rank": 4, "scale": 0.5}], lr=0.05, weight_decay=0.5)
        weight.grad = grad.clone()
        opt.step()
    steps = layer.weight_scale.repeat_interleave(64)[: 32 * 48].view(32, 48)
    assert float(((dense.detach() - w0).abs() / steps).max()) > 5
    assert bool(((layer.weight.dequantized(torch.float32) - dense).abs() <= steps + 1e-6).all())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_cuda_passes_equal_the_eager_reference():
    # eager on CPU vs one torch.compile'd pass on CUDA: the draws are exact integer arithmetic, so
    # codes agree except where a value sits on a rounding boundary and the compiler contracted a
    # multiply-add (at most one code, rarely)
    torch.manual_seed(3)
    layer = Int8Linear.from_linear(nn.Linear(512, 96), group_size=256)
    gpu = copy.deepcopy(layer).cuda()
    assert torch.equal(gpu.weight.dequantized(torch.float32).cpu(), layer.weight.dequantized(torch.float32))
    update = torch.randn(96, 512) * 0.01
    layer.weight.apply_update(update, alpha=0.5, decay=0.99, seed=11)
    gpu.weight.apply_update(update.cuda(), alpha=0.5, decay=0.99, seed=11)
    diff = (gpu.weight_codes.cpu().int() - layer.weight_codes.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    torch.testing.assert_close(gpu.weight_scale.cpu(), layer.weight_scale, rtol=1e-6, atol=0)


def test_quantize_linear_layers_follows_all_linear_and_converts_back():
    model = Tiny()
    ref_loss = loss_of(model).item()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert quantize_linear_layers(model) is model
    assert isinstance(model.up, Int8Linear) and isinstance(model.down, Int8Linear)
    assert type(model.lm_head) is nn.Linear  # the output head is spared, as in lowrank_param_groups
    assert abs(float(loss_of(model)) - ref_loss) < 0.02
    groups = lowrank_param_groups(model, rank=4)
    assert {id(p) for p in groups[1]["params"]} == {id(model.up.weight), id(model.down.weight)}
    dequantize_linear_layers(model)
    assert all(type(m) is nn.Linear for m in (model.up, model.down))
    scale = max(float(o.abs().max()) for o in originals.values()) / 127
    for name in ("up", "down"):
        assert float((getattr(model, name).weight - originals[name]).abs().max()) <= scale
    with pytest.raises(ValueError, match="target_modules"):
        quantize_linear_layers(Tiny(), ["nothing_matches"])


def test_state_dict_round_trips_and_a_full_precision_checkpoint_is_quantized():
    model = quantize_linear_layers(Tiny())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = quantize_linear_layers(Tiny())
    with torch.no_grad():
        fresh.up.weight_codes.zero_()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.up.weight.dequantized(), model.up.weight.dequantized())
    plain = Tiny()
    fresh.load_state_dict(plain.state_dict())  # strict: a full "weight" key fills the codes
    assert torch.equal(fresh.up.weight_codes, model.up.weight_codes)


def test_deepcopy_pickle_and_dtype_moves_keep_int8_storage_linked():
    model = quantize_linear_layers(Tiny())
    for clone in (copy.deepcopy(model), torch.load(_pickled(model), weights_only=False)):
        w = clone.up.weight
        assert isinstance(w, Int8Weight) and w.codes is clone.up.weight_codes and w.stride() == (0, 0)
        assert torch.equal(w.codes, model.up.weight_codes)
    model.to(torch.bfloat16)
    w = model.up.weight
    assert w.dtype == torch.bfloat16 and w.stride() == (0, 0)
    assert model.up.weight_scale.dtype == torch.float32 and w.scale is model.up.weight_scale
    loss_of(model).backward()
    assert model.up.weight.grad.dtype == torch.bfloat16 and model.up.weight.grad.shape == (96, 48)


def _pickled(model: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


def _train(model: nn.Module, steps: int, use_layerwise: bool) -> nn.Module:
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    if use_layerwise:
        layerwise.attach(opt)
    for _ in range(steps):
        loss_of(model).backward()
        if not use_layerwise:
            opt.step()
            opt.zero_grad()
    return model


def test_int8_weights_train_seeded_and_layerwise_equals_ordinary():
    ordinary = _train(quantize_linear_layers(Tiny()), 4, use_layerwise=False)
    again = _train(quantize_linear_layers(Tiny()), 4, use_layerwise=False)
    lw = _train(quantize_linear_layers(Tiny()), 4, use_layerwise=True)
    start = quantize_linear_layers(Tiny())
    for name in ("up", "down"):
        codes = getattr(ordinary, name).weight_codes
        assert torch.equal(codes, getattr(again, name).weight_codes)  # rounding draws are seeded
        assert torch.equal(codes, getattr(lw, name).weight_codes)
        assert not torch.equal(codes, getattr(start, name).weight_codes)
    assert float(loss_of(ordinary)) < float(loss_of(start)) - 0.1


def test_optimizers_that_write_into_parameters_are_refused_for_int8_weights():
    model = quantize_linear_layers(Tiny())
    with pytest.raises(ValueError, match="INT8"):
        layerwise.attach(torch.optim.AdamW(model.parameters()))


def test_ddp_all_reduces_the_int8_weight_gradient_with_init_sync_off(tmp_path):
    def train() -> None:  # DDP, whose reducer holds the group, is gone when it returns
        model = quantize_linear_layers(Tiny())
        ddp = nn.parallel.DistributedDataParallel(model, init_sync=False, broadcast_buffers=False)
        opt = GaLoreAdamW(lowrank_param_groups(model, rank=4), lr=1e-2)
        codes = model.up.weight_codes.clone()
        tokens = torch.randint(0, 32, (2, 5))
        ddp(tokens).sum().backward()
        assert model.up.weight.grad is not None
        opt.step()
        assert not torch.equal(codes, model.up.weight_codes)

    # the group is freed by destroy_process_group, not by the reducer's deallocation: that joined
    # gloo's worker thread holding the GIL the thread needed to free its last work (a hang)
    run_rank(0, 1, str(tmp_path / "init"), train)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_linear_trains_on_cuda_like_on_cpu():
    cpu = quantize_linear_layers(Tiny())
    gpu = copy.deepcopy(cpu).cuda()
    assert gpu.up.weight_codes.is_cuda and gpu.up.weight_scale.dtype == torch.float32
    tokens = torch.randint(0, 32, (4, 9))
    for model in (cpu, gpu):
        t = tokens.to(model.up.weight_codes.device)
        nn.functional.cross_entropy(model(t[:, :-1]).reshape(-1, 32), t[:, 1:].reshape(-1)).backward()
    torch.testing.assert_close(gpu.up.weight.grad.cpu(), cpu.up.weight.grad, rtol=1e-4, atol=1e-5)
    layer, _, interior = _on_grid_layer()
    layer = layer.cuda()
    w0 = layer.weight.dequantized(torch.float32)
    step = layer.weight_scale.repeat_interleave(256).view_as(w0)
    layer.weight.apply_update(-0.1 * step * interior.cuda(), seed=0)
    assert abs(float(((layer.weight.dequantized(torch.float32) - w0) / step)[interior.cuda()].mean()) - 0.1) < 0.02
