"""The Adafactor rule (:mod:`lowmem_optim.rules.adafactor`) on a full-rank group: HF transformers'
Adafactor step for step, at its defaults and at every other setting it takes."""

import pytest
import torch

from lowmem_optim import GaLoreAdafactor
from tests.helpers.reference import step_side_by_side

#: the defaults (a relative step scaled by RMS(W), updates clipped to RMS 1), then the other settings
SETTINGS = [
    {},
    {"clip_threshold": 0.5, "decay_rate": -0.6, "warmup_init": True},
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "eps": (1e-3, 1e-3)},
]


@pytest.mark.parametrize("setting", SETTINGS, ids=["defaults", "clip-decay-warmup", "fixed-lr"])
def test_full_rank_adafactor_group_matches_hf_transformers_adafactor(setting):
    from transformers.optimization import Adafactor

    gen = torch.Generator().manual_seed(6)
    w, b = torch.randn(32, 16, generator=gen), torch.randn(16, generator=gen)
    ours = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    ref = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    kwargs = {"beta1": 0.9, "weight_decay": 0.01, **setting}
    opt, hf = GaLoreAdafactor(ours, **kwargs), Adafactor(ref, **kwargs)
    step_side_by_side(ours, ref, opt, hf, 8, gen)
    for a, c in zip(ours, ref):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
