"""Host-device syncs of a step, for every optimizer of the registry: none on a step without a
refresh, also after load_state_dict.

Parameters live on the ``meta`` device, which stands for a GPU: every op runs shape-only and
:class:`lowmem_optim.tools.op_count.OpCounter` counts each host read of a tensor that is not on the
CPU (``.item()``, ``int(t)``, ``bool(t)``, ``nonzero``) as a sync.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem_optim.projection.feedback import ERROR_FEEDBACK
from lowmem_optim.quant.int8_linear import quantize_linear_layers
from lowmem_optim.registry import LOWRANK_OPTIMIZERS, MATRIX_OPTIMIZERS, OPTIMIZERS, build_optimizer
from lowmem_optim.tools.op_count import OpCounter

#: host reads per refreshed matrix allowed on a refresh step (finite check, zero check, similarity, ...)
REFRESH_SYNCS_PER_MATRIX = 6

#: the registry's optimizers that are not this package's (they cannot update INT8 weights)
BASELINES = frozenset({"adamw", "adamw8bit"})


def _cases() -> list:
    """Every optimizer of the registry: the low-rank ones (DCT-AdamW also with each error
    feedback, GaLore-AdamW also with APOLLO's update forms), the matrix ones full-rank and in a
    subspace, the baselines; INT8 weights for every optimizer that can update them."""
    cases = []
    for name in sorted(OPTIMIZERS):
        lowrank = {"rank": 8, "update_proj_gap": 10**6}
        if name in LOWRANK_OPTIMIZERS:
            setups = [("", lowrank)]
            if name == "dct_adamw":
                setups += [(f"ef={ef}", {**lowrank, "error_feedback": ef}) for ef in ERROR_FEEDBACK if ef]
            if name == "galore_adamw":
                setups += [(f"form={form}", {**lowrank, "update_form": form}) for form in ("channel", "tensor")]
        elif name in MATRIX_OPTIMIZERS:
            setups = [("full-rank", {}), ("lowrank", lowrank)]
        else:
            setups = [("", {})]
        for label, hparams in setups:
            for int8 in (False, True) if name not in BASELINES else (False,):
                ids = "-".join(filter(None, [name, label, "int8" if int8 else "bf16"]))
                cases.append(pytest.param(name, hparams, int8, id=ids))
    return cases


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


@pytest.mark.parametrize(("name", "hparams", "int8"), _cases())
def test_no_sync_without_a_refresh_also_after_load_state_dict(name, hparams, int8):
    model = TwoMatrices(int8).to(torch.bfloat16)
    make = lambda: build_optimizer(name, model, **hparams)  # noqa: E731
    optimizer = make()
    layerwise = hasattr(optimizer, "step_param")
    refresh = _step(model, optimizer, use_layerwise=False)
    assert refresh.syncs <= REFRESH_SYNCS_PER_MATRIX * 2, refresh.sync_ops
    steady = _step(model, optimizer, use_layerwise=False)
    assert steady.ops > 0  # the step ran on the meta tensors
    assert steady.syncs == 0, steady.sync_ops
    resumed = make()
    resumed.load_state_dict(optimizer.state_dict())
    after_load = _step(model, resumed, use_layerwise=layerwise)
    assert after_load.syncs == 0, after_load.sync_ops
