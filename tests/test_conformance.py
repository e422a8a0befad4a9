"""Properties every optimizer of the registry must have, checked on each of its configurations
(like torch's ``OptimizerInfo`` tests): exact resume from a ``weights_only`` state_dict across
refreshes, dtypes on load, zero gradients, state layout, bad hyperparameters, and ``step_param``
equal to ``step``.

:data:`CASES` lists the configurations: every registered name at least once, the low-rank ones
with each projector x schedule x rule x projection storage that the package offers. A name added
to the registry fails :func:`test_every_registered_optimizer_has_cases` until it has one here.
The baselines (``adamw``, ``adamw8bit``) run where the property is about torch.optim's protocol,
not about this package's conventions (step_param, error messages).
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from lowmem_optim.registry import LOWRANK_OPTIMIZERS, MATRIX_OPTIMIZERS, available_optimizers, build_optimizer
from tests.helpers.tiny import OURS, assert_same_state

STEPS, SAVE_AT = 12, 5
TARGET_SEED = 7


class Net(nn.Module):
    """Two linear layers (40 x 24, projected on the right at rank 4; 16 x 40, on the left) and a
    1-D convolution whose weight a normalized-momentum rule sees as a 4 x 12 matrix."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(24, 40)
        self.b = nn.Linear(40, 16)
        self.conv = nn.Conv1d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) + self.conv(x.view(-1, 4, 6)).flatten(1)


def loss_at(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step % 2)  # two batches, alternating
    x = torch.randn(32, 24, generator=gen)
    target = torch.sin(x @ torch.randn(24, 16, generator=torch.Generator().manual_seed(TARGET_SEED)))
    dtype = next(model.parameters()).dtype
    return (model(x.to(dtype)).float() - target).square().mean()


@dataclass(frozen=True)
class Case:
    """A registry name, the hyperparameters ``build_optimizer`` gets, and, for a low-rank case,
    the (gap, number of refreshes) each projected parameter shows after :data:`STEPS` steps."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    refreshes: tuple[int, int] | None = None

    @property
    def id(self) -> str:
        return f"{self.name}-{self.label}" if self.label else self.name


ADAM = {"lr": 3e-2}
ADAFACTOR = {"lr": 3e-2, "beta1": 0.9, "relative_step": False, "scale_parameter": False}
EIGHT_BIT = {"min_8bit_size": 0}  # the tiny moments really are uint8 codes
# scale 1 so a dozen steps train; a refresh every step (fixed), or from every step on (adaptive: with
# cos_threshold 0 the gap doubles after each two refreshes: refreshes at steps 1, 2, 3, 5, 7, 11)
LOW = {"rank": 4, "scale": 1.0, "update_proj_gap": 1, "seed": 3}
GROWING = {"queue_size": 2, "cos_threshold": 0.0}
FIXED = ("fixed", {"refresh": "fixed"}, (1, 12))
ADAPTIVE = ("adaptive", {"refresh": "adaptive", **GROWING}, (4, 6))
MATRIX_LR = {"muon": {"lr": 0.02}, "sinkgd": {"lr": 0.01}, "scale_sgd": {"lr": 0.01}}


def _lowrank(
    name: str,
    base: dict[str, Any],
    proj_method: str | None,
    schedule: tuple,
    proj_bits: int | None = None,
    error_feedback: str | None = None,
    update_form: str | None = None,
) -> Case:
    label, refresh, expected = schedule
    kwargs = {**base, **LOW, **refresh}
    if proj_method is not None:
        kwargs["proj_method"] = proj_method
    if proj_bits is not None:
        kwargs["proj_bits"] = proj_bits
    if error_feedback is not None:
        kwargs["error_feedback"] = error_feedback
    if update_form is not None:
        kwargs["update_form"] = update_form
    parts = [
        proj_method,
        label,
        proj_bits and f"int{proj_bits}",
        error_feedback and f"ef-{error_feedback}",
        update_form and f"form-{update_form}",
    ]
    return Case(name, kwargs, "-".join(filter(None, parts)), expected)


CASES: list[Case] = [
    Case("adamw", ADAM),
    Case("adamw8bit", {**ADAM, **EIGHT_BIT}),
    *[_lowrank("galore_adamw", ADAM, p, s) for p in ("svd", "randomized_svd", "dct") for s in (FIXED, ADAPTIVE)],
    _lowrank("galore_adamw", ADAM, "svd", ADAPTIVE, 4),
    # a random P: an adaptive schedule gets no similarity, so its gap never grows
    _lowrank("galore_adamw", ADAM, "random", FIXED),
    _lowrank("galore_adamw", ADAM, "random", ("adaptive", ADAPTIVE[1], (1, 12))),
    _lowrank("galore_adamw", ADAM, "randomized_svd", FIXED, 8),
    *[
        _lowrank(name, base, p, ADAPTIVE, bits)
        for name, base in (("galore_adafactor", ADAFACTOR), ("galore_adamw8bit", {**ADAM, **EIGHT_BIT}))
        for p, bits in (("randomized_svd", 4), ("dct", None))
    ],
    # Q-GaLore's own schedule is the adaptive one (INT4 projections by default); a fixed one may replace it
    _lowrank("q_galore_adamw8bit", {**ADAM, **EIGHT_BIT}, None, ("adaptive", GROWING, (4, 6))),
    _lowrank("q_galore_adamw8bit", {**ADAM, **EIGHT_BIT}, None, FIXED),
    *[_lowrank("dct_adamw", ADAM, None, s) for s in (FIXED, ADAPTIVE)],
    # error feedback: its buffer in each storage, with each rule
    _lowrank("dct_adamw", ADAM, None, FIXED, error_feedback="float32"),
    _lowrank("dct_adamw", ADAM, None, ADAPTIVE, error_feedback="4bit"),
    _lowrank("galore_adamw8bit", {**ADAM, **EIGHT_BIT}, "svd", FIXED, error_feedback="8bit"),
    _lowrank("galore_adafactor", ADAFACTOR, "randomized_svd", ADAPTIVE, 4, error_feedback="4bit"),
    # APOLLO's channel-scaled gradient from a random subspace, and APOLLO-Mini at its own rank 1 and scale
    _lowrank("apollo", ADAM, None, FIXED),
    _lowrank("apollo", ADAM, "svd", FIXED),
    Case("apollo_mini", {**ADAM, "update_proj_gap": 2, "seed": 3}, "rank1", (2, 6)),
    # full-rank updates from low-rank state (lowmem_optim.update_forms): Fira on each projector and INT4 bases,
    # APOLLO's channel and tensor scaling
    _lowrank("fira", ADAM, "svd", FIXED),
    _lowrank("fira", ADAM, "dct", ADAPTIVE),
    _lowrank("fira", ADAM, "randomized_svd", FIXED, 4),
    _lowrank("galore_adamw", ADAM, "svd", ADAPTIVE, update_form="channel"),
    _lowrank("galore_adamw", ADAM, "randomized_svd", FIXED, update_form="tensor"),
    # the class defaults, but Muon's lr is Keller Jordan's 0.02 (torch's default 1e-3 barely moves in a dozen steps)
    *[Case(name, MATRIX_LR.get(name, {})) for name in sorted(MATRIX_OPTIMIZERS)],
    # the rule in a rank-3 subspace of each matrix (the 4 x 12 conv weight too), refreshed every 2 steps
    *[
        Case(name, {**MATRIX_LR.get(name, {}), "rank": 3, "update_proj_gap": 2}, "rank3", (2, 6))
        for name in sorted(MATRIX_OPTIMIZERS)
    ],
    # SCALE's channel normalization with a momentum (the paper's output-head setting)
    Case("scale_sgd", {**MATRIX_LR["scale_sgd"], "momentum": 0.9}, "momentum"),
    Case(
        "scale_sgd",
        {**MATRIX_LR["scale_sgd"], "momentum": 0.9, "rank": 3, "update_proj_gap": 2},
        "momentum-rank3",
        (2, 6),
    ),
    # the momentum stored with stochastic rounding: full-rank, and in a subspace (DCT's moves it)
    Case("muon", {**MATRIX_LR["muon"], "momentum_dtype": "bfloat16"}, "momentum-bfloat16"),
    Case("muon", {**MATRIX_LR["muon"], "momentum_dtype": "8bit"}, "momentum-8bit"),
    Case("muon", {**MATRIX_LR["muon"], "momentum_dtype": "4bit"}, "momentum-4bit"),
    Case(
        "hybrid_auon",
        {"momentum_dtype": "bfloat16", "rank": 3, "update_proj_gap": 2},
        "rank3-momentum-bfloat16",
        (2, 6),
    ),
    Case(
        "auon",
        {"momentum_dtype": "8bit", "rank": 3, "update_proj_gap": 2, "proj_method": "dct"},
        "rank3-dct-momentum-8bit",
        (2, 6),
    ),
    Case(
        "auon",
        {"momentum_dtype": "4bit", "rank": 3, "update_proj_gap": 2, "proj_method": "dct"},
        "rank3-dct-momentum-4bit",
        (2, 6),
    ),
]
OUR_CASES = [case for case in CASES if case.name in OURS]


def params(cases: list[Case]) -> list:
    """pytest parameters of ``cases``, named by their ids."""
    return [pytest.param(case, id=case.id) for case in cases]


def build(case: Case, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
    return build_optimizer(case.name, model, **{**case.kwargs, **overrides})


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        opt.zero_grad()
        loss = loss_at(model, step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_every_registered_optimizer_has_cases():
    assert {case.name for case in CASES} == set(available_optimizers())


@pytest.mark.parametrize("case", params(CASES))
def test_resumes_bit_for_bit_from_a_weights_only_state_dict_across_refreshes(case):
    """Save after SAVE_AT steps, load with ``weights_only=True`` into a fresh model and optimizer,
    continue: parameters and state equal the uninterrupted run's, refreshes included."""
    straight = Net()
    opt = build(case, straight)
    losses = train(straight, opt, range(STEPS))

    first = Net()
    opt_first = build(case, first)
    train(first, opt_first, range(SAVE_AT))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = Net()
    resumed.load_state_dict(saved["model"])
    opt_resumed = build(case, resumed)
    opt_resumed.load_state_dict(saved["optim"])
    train(resumed, opt_resumed, range(SAVE_AT, STEPS))

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert_same_state(opt_resumed.state_dict(), opt.state_dict())
    if case.refreshes is not None:
        stats = [s for s in opt.layer_stats() if s["rank"] is not None]
        assert stats and all((s["gap"], s["refreshes"]) == case.refreshes for s in stats), stats
        assert [s["refreshes"] for s in opt_resumed.layer_stats()] == [s["refreshes"] for s in opt.layer_stats()]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses


@pytest.mark.parametrize("case", params(OUR_CASES))
def test_state_holds_only_tensors_and_plain_numbers(case):
    model = Net()
    opt = build(case, model)
    train(model, opt, range(3))
    for pid, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.is_tensor(value) or type(value) in (int, float), (pid, key, type(value))


def _without_weight_decay(case: Case) -> dict[str, float]:
    return {"weight_decay": 0.0, **({"adamw_weight_decay": 0.0} if case.name in MATRIX_OPTIMIZERS else {})}


@pytest.mark.parametrize("case", params(CASES))
def test_zero_gradient_steps_move_nothing_without_weight_decay(case):
    """Four all-zero gradients, refreshes among them (an SVD, DCT or sketch of a zero matrix):
    parameters unchanged, state finite."""
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build(case, model, **_without_weight_decay(case))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(4):
        opt.step()
    for (name, p), q in zip(model.named_parameters(), before):
        assert torch.equal(p, q), name
        assert opt.state[p], name  # stepped, not skipped
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.isfinite(value).all(), (name, key)


@pytest.mark.parametrize("case", params(CASES))
def test_state_loaded_into_bfloat16_parameters_has_the_dtypes_of_state_made_in_bfloat16(case):
    """A float32 run's state_dict loaded into bfloat16 parameters holds, key by key, the dtypes the
    optimizer gives state it creates for bfloat16 parameters (torch.optim.AdamW: moments in the
    parameter's dtype); the next step runs and keeps the parameters in bfloat16."""
    model = Net()
    opt = build(case, model)
    train(model, opt, range(2))
    native_model = copy.deepcopy(model).to(torch.bfloat16)
    native = build(case, native_model)
    train(native_model, native, range(2))
    loaded_model = copy.deepcopy(model).to(torch.bfloat16)
    loaded = build(case, loaded_model)
    loaded.load_state_dict(opt.state_dict())

    for (name, p), q in zip(loaded_model.named_parameters(), native_model.parameters()):
        got = {k: v.dtype for k, v in loaded.state[p].items() if torch.is_tensor(v)}
        want = {k: v.dtype for k, v in native.state[q].items() if torch.is_tensor(v)}
        assert got == want, name
    train(loaded_model, loaded, range(2, 3))
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in loaded_model.parameters())


@pytest.mark.parametrize("case", params(OUR_CASES))
def test_step_param_of_each_parameter_equals_step(case):
    """Layer-wise training's per-parameter step gives the parameters and state of ``step``."""
    whole, by_param = Net(), Net()
    opt, opt_by_param = build(case, whole), build(case, by_param)
    train(whole, opt, range(6))
    for step in range(6):
        opt_by_param.zero_grad()
        loss_at(by_param, step).backward()
        for group in opt_by_param.param_groups:
            for p in group["params"]:
                opt_by_param.step_param(p)
    for (name, a), b in zip(whole.named_parameters(), by_param.parameters()):
        assert torch.equal(a, b), name
    assert_same_state(opt_by_param.state_dict(), opt.state_dict())


ADAM_NAMES = ("galore_adamw", "galore_adamw8bit", "q_galore_adamw8bit", "dct_adamw", "fira")
NEWTON_SCHULZ = ("hybrid_auon", "muon")
#: the matrix optimizers whose rule has a momentum (SCALE's without ``nesterov``)
MOMENTUM_NAMES = ("auon", "hybrid_auon", "muon", "scale_sgd")
#: (names, hyperparameters, what the ValueError must name)
BAD: list[tuple[tuple[str, ...], dict[str, Any], str]] = [
    (tuple(OURS), {"lr": -1.0}, "lr"),
    (tuple(OURS), {"weight_decay": -0.1}, "weight_decay"),
    (ADAM_NAMES, {"betas": (1.0, 0.999)}, "beta"),
    (ADAM_NAMES, {"betas": (0.9, -0.1)}, "beta"),
    (ADAM_NAMES, {"eps": -1e-8}, "eps"),
    (("galore_adafactor",), {"lr": 1e-3}, "relative_step"),
    (("galore_adafactor",), {"relative_step": False}, "lr"),
    (("galore_adafactor",), {"eps": 1e-30}, "eps"),
    (("galore_adafactor",), {"beta1": 1.5}, "beta1"),
    (("galore_adafactor",), {"decay_rate": 0.5}, "decay_rate"),
    (("galore_adafactor",), {"clip_threshold": 0}, "clip_threshold"),
    *[
        (tuple(sorted(LOWRANK_OPTIMIZERS | MATRIX_OPTIMIZERS)), kwargs, key)
        for kwargs, key in [
            ({"rank": 0}, "rank"),
            ({"rank": 2.5}, "rank"),
            ({"update_proj_gap": 0}, "update_proj_gap"),
            ({"scale": 0.0}, "scale"),
            ({"scale": math.nan}, "scale"),
            ({"proj_type": "diagonal"}, "proj_type"),
            ({"proj_method": "qr"}, "proj_method"),
            ({"refresh": "sometimes"}, "refresh"),
        ]
    ],
    (MOMENTUM_NAMES, {"momentum": 1.0}, "momentum"),
    (MOMENTUM_NAMES, {"momentum": -0.5}, "momentum"),
    (MOMENTUM_NAMES, {"nesterov": 1}, "nesterov"),
    (("sinkgd",), {"momentum": 0.9}, "momentum"),
    (("sinkgd",), {"sinkhorn_iterations": 0}, "sinkhorn_iterations"),
    (("sinkgd",), {"sinkhorn_iterations": 2.0}, "sinkhorn_iterations"),
    (("fira",), {"norm_growth_limit": 1.0}, "norm_growth_limit"),
    (("fira",), {"norm_growth_limit": math.inf}, "norm_growth_limit"),
    (("fira",), {"update_form": "projected"}, "update_form"),
    (("fira",), {"error_feedback": "float32"}, "error_feedback=.*update_form"),
    (("galore_adamw",), {"update_form": "sideways"}, "update_form"),
    (("galore_adamw",), {"update_form": "channel", "proj_type": "full"}, "proj_type='full' with update_form"),
    (tuple(sorted(MATRIX_OPTIMIZERS)), {"adjust_lr_fn": "sqrt"}, "adjust_lr_fn"),
    (tuple(sorted(MATRIX_OPTIMIZERS)), {"adamw_lr": -1e-3}, "adamw_lr"),
    (tuple(sorted(MATRIX_OPTIMIZERS)), {"adamw_betas": (1.0, 0.9)}, "beta"),
    (("auon", "hybrid_auon"), {"gamma": 0.0}, "gamma"),
    (("auon", "hybrid_auon"), {"gamma": math.nan}, "gamma"),
    (("auon",), {"normalize": "yes"}, "normalize"),
    (NEWTON_SCHULZ, {"ns_steps": 0}, "ns_steps"),
    (NEWTON_SCHULZ, {"ns_steps": True}, "ns_steps"),
    (NEWTON_SCHULZ, {"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
    (NEWTON_SCHULZ, {"ns_dtype": "float16"}, "ns_dtype"),
    (tuple(sorted(MATRIX_OPTIMIZERS)), {"momentum_dtype": "int8"}, "momentum_dtype"),
]
SUBSPACE_KEYS = {"rank", "update_proj_gap", "scale", "proj_type"}


def _bad_params() -> list:
    return [
        pytest.param(name, kwargs, key, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in kwargs.items())}")
        for names, kwargs, key in BAD
        for name in names
    ]


@pytest.mark.parametrize("name, kwargs, key", _bad_params())
def test_bad_hyperparameters_raise_a_value_error_naming_them(name, kwargs, key):
    # AuON/Muon read the subspace keys only in a group with a rank
    low = {"rank": 4} if name in LOWRANK_OPTIMIZERS or not SUBSPACE_KEYS.isdisjoint(kwargs) else {}
    with pytest.raises(ValueError, match=key):
        build_optimizer(name, Net(), **{**low, **kwargs})


#: gradient scales every optimizer meets: below float32's normal range of a square, where a
#: float32 sum of squares overflows, and where a single square does
GRADIENT_SCALES = (1e-30, 1e19, 1e30)
#: (registry name, scale) whose second moment (a square of the gradient) overflows float32 into
#: NaN weights: bitsandbytes' AdamW8bit, a baseline this package does not change
SECOND_MOMENT_OVERFLOW = {("adamw8bit", 1e30)}


def _scaled_gradient_params(cases: list[Case]) -> list:
    return [
        pytest.param(
            case,
            scale,
            dtype,
            id=f"{case.id}-{scale:g}-{str(dtype).removeprefix('torch.')}",
            marks=[pytest.mark.xfail(strict=True, reason="second moment overflows float32")]
            if (case.name, scale) in SECOND_MOMENT_OVERFLOW
            else [],
        )
        for case in cases
        for scale in GRADIENT_SCALES
        for dtype in (torch.float32, torch.bfloat16)
    ]


def _step_with_gradients_of_scale(case: Case, scale: float, dtype: torch.dtype, steps: int = 2):
    """``steps`` steps of a fresh Net in ``dtype`` on gradients ``scale`` x N(0, 1), no weight decay;
    (the model, its weights before each step)."""
    model = Net().to(dtype)
    opt = build(case, model, **_without_weight_decay(case))
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        history.append([p.detach().clone() for p in model.parameters()])
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=gen) * scale).to(dtype)
        opt.step()
    return model, history


@pytest.mark.parametrize("case, scale, dtype", _scaled_gradient_params(CASES))
def test_a_finite_gradient_of_any_scale_gives_finite_weights(case, scale, dtype):
    """No error either: FloatingPointError is for gradients that hold inf/NaN."""
    model, _ = _step_with_gradients_of_scale(case, scale, dtype)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


@pytest.mark.parametrize(
    "case, scale, dtype",
    [
        pytest.param(*param.values, id=param.id)
        for param in _scaled_gradient_params([c for c in CASES if c.name in MATRIX_OPTIMIZERS | {"galore_adafactor"}])
        if param.values[1] > 1
    ],
)
def test_scale_free_rules_move_every_matrix_on_every_step_of_huge_finite_gradients(case, scale, dtype):
    """Normalized momentum and Adafactor's clipped update do not depend on the gradient's scale, but
    ||D||_F or a square of entries near 1e19 overflows float32: the update must neither collapse to
    zero nor turn NaN, on the first step or after."""
    model, history = _step_with_gradients_of_scale(case, scale, dtype)
    after = [p.detach() for p in model.parameters()]
    for before, later in zip(history, history[1:] + [after]):
        for (name, p), q, r in zip(model.named_parameters(), before, later):
            if p.dim() >= 2:
                assert not torch.equal(q, r), name
                assert torch.isfinite(r).all(), name


class WithZeroSize(nn.Module):
    """Net's layers and two zero-size linear layers (0 x 24 and 40 x 0 weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        self.no_rows, self.no_columns = nn.Linear(24, 0), nn.Linear(0, 40)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("case", params(CASES))
def test_zero_size_parameters_step_without_error_and_the_others_train(case):
    model = WithZeroSize()
    opt = build(case, model)
    before = [p.detach().clone() for p in model.net.parameters()]
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.net.parameters(), before))
    assert [tuple(p.shape) for p in model.no_rows.parameters()] == [(0, 24), (0,)]


class Wider(Net):
    """Net with a 48-wide hidden layer: as many parameters, in the same order, of other shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(24, 48), nn.Linear(48, 16)


@pytest.mark.parametrize("case", params(OUR_CASES))
def test_state_of_parameters_of_another_shape_is_refused_naming_the_parameter(case):
    model = Net()
    opt = build(case, model)
    train(model, opt, range(2))
    other = build(case, Wider())
    refused = r"load_state_dict: the saved state of parameter '[ab]\.\w+' .* holds \w+ of shape \("
    with pytest.raises(ValueError, match=refused):
        other.load_state_dict(opt.state_dict())
    assert not other.state  # nothing was loaded


@pytest.mark.parametrize(
    "case, scale, dtype",
    [
        pytest.param(*param.values, id=param.id)
        for param in _scaled_gradient_params([c for c in CASES if c.name in LOWRANK_OPTIMIZERS])
        if param.values[1] > 1
    ],
)
def test_projected_matrices_move_on_every_step_of_huge_finite_gradients(case, scale, dtype):
    """A projected gradient's entries past 2^63 have squares beyond float32: Adam's moment would be
    infinite (a zero update for good; NaN codes in 8 bits) and Adafactor's factors NaN."""
    model, history = _step_with_gradients_of_scale(case, scale, dtype)
    after = dict(model.named_parameters())
    for before, later in zip(history, history[1:] + [[p.detach() for p in model.parameters()]]):
        for (name, _), q, r in zip(model.named_parameters(), before, later):
            if name in ("a.weight", "b.weight"):
                assert not torch.equal(q, r) and torch.isfinite(r).all(), name
    assert all(torch.isfinite(p).all() for p in after.values())
