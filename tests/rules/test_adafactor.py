"""The Adafactor rule (:mod:`lowmem_optim.rules.adafactor`) on a full-rank group: HF transformers'
Adafactor step for step."""

import torch

from lowmem_optim import GaLoreAdafactor
from tests.helpers.reference import step_side_by_side


def test_full_rank_adafactor_group_matches_hf_transformers_adafactor():
    from transformers.optimization import Adafactor

    gen = torch.Generator().manual_seed(6)
    w, b = torch.randn(32, 16, generator=gen), torch.randn(16, generator=gen)
    ours = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    ref = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    opt, hf = GaLoreAdafactor(ours, beta1=0.9, weight_decay=0.01), Adafactor(ref, beta1=0.9, weight_decay=0.01)
    step_side_by_side(ours, ref, opt, hf, 8, gen)
    for a, c in zip(ours, ref):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
