"""APOLLO and APOLLO-Mini against a float64 reference of the paper's equations (random P
regenerated from the seed, Adam on R, channel- or tensor-wise scaling of G, the norm-growth
limiter, decoupled decay), and APOLLO-Mini's rank-1 default. Resume, layer-wise stepping and
the other shared properties are in tests/test_conformance.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowmem_optim import APOLLO, APOLLOMini, build_optimizer
from lowmem_optim.engine.param_step import refresh_seed
from lowmem_optim.layerwise import attach
from tests.helpers.reference import adam_ref

LR, WD, SEED = 1e-2, 0.1, 5


def _gaussian(seed: int, rows: int, rank: int) -> torch.Tensor:
    """The paper's P_t ~ N(0_seed, 1/r), drawn as the projector draws it (float32, from ``seed``)."""
    draw = torch.randn(rows, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (draw * (1 / math.sqrt(rank))).double()


def apollo_ref(
    w0: torch.Tensor, grads: list[torch.Tensor], *, rank: int, gap: int, scale: float, per_channel: bool, gamma: float
) -> torch.Tensor:
    """APOLLO (Algorithm 1 of the paper) in float64 for one m x n weight, m < n (P^T G is r x n)."""
    w = w0.double().clone()
    state: dict = {}
    previous = None  # ||S_{t-1}|| / lr
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if (t - 1) % gap == 0:
            p = _gaussian(refresh_seed(SEED, 0, t), w.shape[0], rank)
        r = p.T @ g
        n = adam_ref(state, r, t, LR)
        if per_channel:
            s = g * (n.norm(dim=0) / r.norm(dim=0))[None, :]  # one factor per column
        else:
            s = g * (n.norm() / r.norm())
        norm = float(s.norm()) / LR
        if previous is not None and norm > gamma * previous:
            s = s * (gamma * previous / norm)
            norm = gamma * previous
        previous = norm
        w = w * (1 - LR * WD) - scale * s
    return w


def _run(cls: type, w0: torch.Tensor, grads: list[torch.Tensor], **group) -> torch.Tensor:
    p = nn.Parameter(w0.clone())
    opt = cls([{"params": [p], **group}], lr=LR, weight_decay=WD, seed=SEED)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def _grads(shape: tuple[int, int]) -> list[torch.Tensor]:
    """Three independent gradients, then one repeated: Adam's |N| / |R| grows back toward 1 as
    the moments agree again, so the scaled term grows by more than 1% a step and the limiter acts."""
    gen = torch.Generator().manual_seed(3)
    noisy = [torch.randn(shape, generator=gen) for _ in range(3)]
    return noisy + [torch.randn(shape, generator=gen)] * 4


@pytest.mark.parametrize("cls, rank, per_channel", [(APOLLO, 4, True), (APOLLOMini, 1, False)])
def test_matches_the_float64_reference_of_the_papers_equations(cls, rank, per_channel):
    shape = (16, 40)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grads = _grads(shape)
    ours = _run(cls, w0, grads, rank=rank, update_proj_gap=3)  # new P at steps 1, 4, 7
    scale = 1.0 if cls is APOLLO else math.sqrt(128)
    ref = apollo_ref(w0, grads, rank=rank, gap=3, scale=scale, per_channel=per_channel, gamma=1.01)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-6 * scale)
    unlimited = apollo_ref(w0, grads, rank=rank, gap=3, scale=scale, per_channel=per_channel, gamma=math.inf)
    assert (unlimited - ref).abs().max() > 1e-4  # the limiter acted (50x the tolerance above)


def test_the_defaults_are_the_papers():
    p = nn.Parameter(torch.zeros(4, 8))
    apollo, mini = APOLLO([{"params": [p], "rank": 2}]), APOLLOMini([{"params": [p], "rank": 1}])
    for opt, form, scale in ((apollo, "channel", 1.0), (mini, "tensor", math.sqrt(128))):
        group = opt.param_groups[0]
        assert (group["proj_method"], group["update_form"], group["scale"]) == ("random", form, scale)
        assert (group["update_proj_gap"], group["norm_growth_limit"], group["rule"]) == (200, 1.01, "adam")


def test_apollo_mini_groups_built_for_it_are_rank_1_unless_told_otherwise():
    model = nn.Sequential(nn.Linear(24, 16), nn.Linear(16, 8))
    ranks = lambda opt: [g.get("rank") for g in opt.param_groups]  # noqa: E731
    assert ranks(build_optimizer("apollo_mini", model)) == [None, 1]
    assert ranks(build_optimizer("apollo_mini", model, rank=2)) == [None, 2]
    with pytest.raises(ValueError, match="'rank' is required"):
        build_optimizer("apollo", model)  # APOLLO's rank depends on the model: no default


def test_low_rank_gradient_accumulation_is_refused_for_apollo():
    opt = build_optimizer("apollo", nn.Sequential(nn.Linear(24, 16)), rank=4)
    with pytest.raises(ValueError, match="Invalid accumulation_buffer with update_form='channel'"):
        attach(opt, accumulation_steps=2, accumulation_buffer="float32")
