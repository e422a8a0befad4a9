"""Host-device syncs of a step: none on a step without a refresh, also after load_state_dict.

Parameters live on the ``meta`` device, which stands for a GPU: every op runs shape-only and
:class:`lowmem_optim.op_count.OpCounter` counts each host read of a tensor that is not on the
CPU (``.item()``, ``int(t)``, ``bool(t)``, ``nonzero``) as a sync.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem_optim.op_count import OpCounter
from lowmem_optim.quant.int8_linear import quantize_linear_layers
from lowmem_optim.registry import LOWRANK_OPTIMIZERS, build_optimizer

#: host reads per refreshed matrix allowed on a refresh step (finite check, zero check, similarity, ...)
REFRESH_SYNCS_PER_MATRIX = 6
#: GaLoreAdafactor reads two norms per parameter on the host every step (HF's Adafactor's
#: relative step and update clipping); every other low-rank optimizer reads none
STEADY_SYNCS = {"galore_adafactor": 2}


class TwoMatrices(nn.Module):
    def __init__(self, int8: bool) -> None:
        super().__init__()
        with torch.device("meta"):
            self.a = nn.Linear(64, 48)
            self.b = nn.Linear(48, 80)
        if int8:
            quantize_linear_layers(self)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, use_layerwise: bool) -> OpCounter:
    with OpCounter() as counter:
        if use_layerwise:
            for p in model.parameters():  # what backward does: the hook runs as each gradient is complete
                p.grad = torch.empty(p.shape, dtype=p.dtype, device="meta")
                optimizer.step_param(p)
                p.grad = None
        else:
            for p in model.parameters():
                p.grad = torch.empty(p.shape, dtype=p.dtype, device="meta")
            optimizer.step()
    return counter


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("name", sorted(LOWRANK_OPTIMIZERS))
def test_no_sync_without_a_refresh_also_after_load_state_dict(name, int8):
    model = TwoMatrices(int8).to(torch.bfloat16)
    make = lambda: build_optimizer(name, model, rank=8, update_proj_gap=10**6)  # noqa: E731
    optimizer = make()
    refresh = _step(model, optimizer, use_layerwise=False)
    steady = STEADY_SYNCS.get(name, 0) * 4  # two weights, two biases
    assert refresh.syncs <= REFRESH_SYNCS_PER_MATRIX * 2 + steady, refresh.sync_ops
    assert _step(model, optimizer, use_layerwise=False).syncs == steady
    resumed = make()
    resumed.load_state_dict(optimizer.state_dict())
    after_load = _step(model, resumed, use_layerwise=True)
    assert after_load.syncs == steady, after_load.sync_ops
