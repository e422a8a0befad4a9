"""Adafactor's relative step reads RMS(W) of the real weight, also when the weight is INT8."""

import pytest
import torch
from torch import nn

import lowmem_optim.quant.int8_linear as int8_linear
from lowmem_optim.parts import defaults
from lowmem_optim.quant.int8_linear import Int8Linear
from lowmem_optim.rules.adafactor import AdafactorRule, weight_rms


def _layer() -> tuple[Int8Linear, torch.Tensor]:
    torch.manual_seed(0)
    linear = nn.Linear(40, 24, bias=False)
    linear.weight.data.mul_(0.2)
    layer = Int8Linear.from_linear(linear, group_size=64)
    return layer, layer.weight.dequantized(torch.float32)


@pytest.mark.parametrize("chunk", [1 << 22, 128])
def test_int8_weight_rms_is_the_dequantized_weights_chunk_by_chunk(monkeypatch, chunk):
    monkeypatch.setattr(int8_linear, "UPDATE_CHUNK", chunk)  # 128: eight chunks of two groups
    layer, dense = _layer()
    rms = weight_rms(layer.weight)
    assert rms.shape == () and rms.device == dense.device  # on the weight's device: no host read
    assert float(rms) == pytest.approx(float(dense.square().mean().sqrt()), rel=1e-6)
    assert float(rms) > 0.01


def test_relative_step_of_an_int8_weight_is_its_dequantized_copys():
    """Relative step with scale_parameter: lr_t = max(eps2, RMS(W)) min(1e-2, 1/sqrt(t))."""
    layer, dense = _layer()
    rule = AdafactorRule()
    g = torch.randn(24, 4, generator=torch.Generator().manual_seed(1))  # a projected gradient
    steps = {}
    for name, param in (("int8", layer.weight), ("dense", nn.Parameter(dense))):
        state = {"step": torch.tensor(1.0)}
        update, lr_t = rule.update(g, state, defaults(rule), param)
        steps[name] = (update, float(lr_t))
    rms = float(dense.square().mean().sqrt())
    assert steps["int8"][1] == pytest.approx(steps["dense"][1], rel=1e-6)
    assert steps["int8"][1] == pytest.approx(rms * 1e-2, rel=1e-6)  # not the eps2 floor, 1e-3 * 1e-2
    torch.testing.assert_close(steps["int8"][0], steps["dense"][0])
