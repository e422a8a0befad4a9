"""Every projector x schedule x rule x projection storage: trains, and resumes bit for bit from a
weights_only state_dict across refreshes."""

import io

import pytest
import torch

from lowmem_optim.engine import ComposedOptimizer

TARGET_SEED = 7


def _model() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"a": torch.nn.Linear(24, 40), "b": torch.nn.Linear(40, 16)})


def _loss(model: torch.nn.ModuleDict, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step % 2)  # two batches, alternating
    x = torch.randn(32, 24, generator=gen)
    target = torch.sin(x @ torch.randn(24, 16, generator=torch.Generator().manual_seed(TARGET_SEED)))
    return (model["b"](torch.tanh(model["a"](x))) - target).square().mean()


def _optimizer(model: torch.nn.ModuleDict, lowrank: dict, rule: str) -> ComposedOptimizer:
    defaults = {"adam": dict(lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
                "adam8bit": dict(lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size=0),
                "adafactor": dict(lr=3e-2, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=0.9,
                                  weight_decay=0.0, scale_parameter=False, relative_step=False, warmup_init=False)}
    matrices = [model["a"].weight, model["b"].weight]
    vectors = [model["a"].bias, model["b"].bias]
    groups = [{"params": vectors}, {"params": matrices, "rank": 4, "scale": 1.0, **lowrank}]
    return ComposedOptimizer(groups, {"rule": rule, "rank": None, "update_proj_gap": 2, "scale": 1.0,
                                     "proj_type": "std", "proj_method": "svd", "refresh": "fixed", "seed": 3,
                                     **defaults[rule]})


def _train(model, opt, steps: range) -> list[float]:
    losses = []
    for step in steps:
        opt.zero_grad()
        loss = _loss(model, step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


CASES = [
    # (proj_method, refresh, proj_bits, rule)
    *[(p, s, None, "adam") for p in ("svd", "randomized_svd", "dct") for s in ("fixed", "adaptive")],
    ("svd", "adaptive", 4, "adam"),
    ("randomized_svd", "fixed", 8, "adam"),
    *[(p, "adaptive", bits, r) for p, bits in (("randomized_svd", 4), ("dct", None)) for r in ("adafactor", "adam8bit")],
]


@pytest.mark.parametrize("proj_method, refresh, proj_bits, rule", CASES)
def test_trains_and_resumes_bitwise_from_a_weights_only_state_dict(proj_method, refresh, proj_bits, rule):
    lowrank = {"proj_method": proj_method, "refresh": refresh, "update_proj_gap": 1}
    if refresh == "adaptive":
        lowrank.update(queue_size=2, cos_threshold=0.0)  # the gap grows 1 -> 2 -> 4 within the run
    if proj_bits is not None:
        lowrank["proj_bits"] = proj_bits
    straight = _model()
    opt = _optimizer(straight, lowrank, rule)
    losses = _train(straight, opt, range(12))

    first = _model()
    opt_first = _optimizer(first, lowrank, rule)
    _train(first, opt_first, range(5))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt_resumed = _optimizer(resumed, lowrank, rule)
    opt_resumed.load_state_dict(saved["optim"])
    _train(resumed, opt_resumed, range(5, 12))

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    stats = opt.layer_stats()
    assert [s["refreshes"] for s in stats] == [s["refreshes"] for s in opt_resumed.layer_stats()]
    if refresh == "adaptive":
        assert all(s["gap"] == 4 and s["refreshes"] == 6 for s in stats)  # steps 1, 2, 3, 5, 7, 11
    else:
        assert all(s["gap"] == 1 and s["refreshes"] == 12 for s in stats)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])
