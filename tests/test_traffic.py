"""The bytes a rank sends through the optimizers' collectives, predicted from shapes
(lowmem_optim/tools/traffic.py), against counts worked out by hand for one 16 x 32 weight on 2
ranks (ring algorithms: an all-reduce of B bytes sends B, an all-gather B / 2). tests/test_sharding.py
checks the prediction against the bytes counted in runs of every sharded case."""

from __future__ import annotations

import pytest
import torch

from lowmem_optim.registry import build_optimizer
from lowmem_optim.tools.traffic import gather_every_gradient_bytes, left_split, predicted_bytes, step_bytes


class _OneWeight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 16, bias=False)


def test_a_left_projection_reduces_r_gathers_the_split_update_and_gathers_the_gradient_to_refresh():
    model = _OneWeight()
    galore = build_optimizer("galore_adamw", model, rank=4)
    # R = P^T G is 4 x 32 (512 bytes): all-reduced (512) and the update of each rank's rows gathered (256);
    # a refresh adds three 4-byte flags (some rank's gradient not finite, checked by the optimizer and by
    # the projector; all zero) and the whole gradient gathered (2048 / 2); a later one also sums three
    # float32 dot products of the old and new leading vectors of P (12)
    assert predicted_bytes(galore, 2) == (768, 768 + 12 + 1024, 768 + 12 + 1024 + 12)
    # the DCT reads R from the gathered spectrum: the all-reduce of R is saved on a refresh step, and no
    # finiteness flag of its own; a later refresh moves Adam's two moments of R's split rows (2 x 512 / 2)
    dct = build_optimizer("dct_adamw", model, rank=4)
    assert predicted_bytes(dct, 2) == (768, 768 + 8 + 1024 - 512, 768 + 8 + 1024 - 512 + 512)
    # Adam's two moments of R: 1024 bytes whole, half of them with R's rows split over 2 ranks
    assert left_split(galore, 2) == {"split_state": 512, "replicated_state": 1024, "gather_bytes": 256, "split": True}


def test_muon_gathers_its_whole_update_every_step_as_gathering_every_gradient_would():
    model = _OneWeight()
    assert predicted_bytes(build_optimizer("muon", model), 2) == (1024, 1024, 1024)
    assert gather_every_gradient_bytes(model, 2) == 1024


class _TwoWeights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(32, 16, bias=False)
        self.b = torch.nn.Linear(32, 16, bias=False)


def test_a_staggered_step_sends_each_refreshing_weights_share_and_one_flag():
    model = _TwoWeights()
    galore = build_optimizer("galore_adamw", model, rank=4, stagger=True)
    # per weight as above: 768 a plain step, +1024 to gather its gradient and +12 for its projector's
    # flag and the similarity on a later refresh; the optimizer's own flag (4) once per refreshing step
    assert step_bytes(galore, 2, {}) == 2 * 768
    assert step_bytes(galore, 2, {model.a.weight: "later_refresh"}) == 2 * 768 + 1024 + 8 + 12 + 4
    assert step_bytes(galore, 2, dict.fromkeys(model.parameters(), "refresh")) == predicted_bytes(galore, 2).refresh
    with pytest.raises(ValueError, match="Invalid refreshing: 'first'.*allowed: 'refresh', 'later_refresh'"):
        step_bytes(galore, 2, {model.a.weight: "first"})
