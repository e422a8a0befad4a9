"""One declaration per setting: what the parts declare is what the optimizers accept, default,
validate, document, route and expose as CLI flags."""

import pytest
import torch
from torch import nn

import lowmem_optim
from lowmem_optim import DCTAdamW, GaLoreAdamW, QGaLoreAdamW8bit, build_optimizer
from lowmem_optim.engine import ENGINE_HPARAMS, ComposedOptimizer, group_parts, lowrank_hparams
from lowmem_optim.parts import HParam, defaults, integer, invalid, number, one_of, optional
from lowmem_optim.projection import PROJECTORS
from lowmem_optim.registry import available_optimizers, get_optimizer_class
from lowmem_optim.rules import RULES
from lowmem_optim.schedules import SCHEDULES

NAMED = [
    get_optimizer_class(name)
    for name in available_optimizers()
    if issubclass(get_optimizer_class(name), ComposedOptimizer)
]


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def test_checks_allow_exactly_what_they_say():
    assert integer(1)(3) and not integer(1)(0) and not integer(1)(True) and not integer(1)(2.0)
    assert number(0, 1, high_open=True)(0.5) and not number(0, 1, high_open=True)(1.0)
    assert not number(0)(float("nan")) and not number(0)(float("inf")) and not number(0)(False)
    assert one_of(None, 4, 8)(None) and one_of(None, 4, 8)(4) and not one_of(None, 4, 8)(True)
    assert optional(integer(1))(None) and not optional(integer(1))(0)
    assert str(invalid("rank", 0, "an int >= 1")) == "Invalid rank: 0 (allowed: an int >= 1)"
    with pytest.raises(ValueError, match=r"Invalid --gap: 0 \(allowed: an int >= 1\)"):
        HParam("gap", 1, integer(1), "doc").validate(0, "--gap")


def test_every_declared_default_passes_its_own_check():
    parts = [cls() for registry in (PROJECTORS, SCHEDULES) for cls in registry.values()]
    parts += [cls() for cls in RULES.values()] + [p.storage for p in parts if getattr(p, "storage", None)]
    for hp in [*ENGINE_HPARAMS, *(hp for part in parts for hp in part.hparams)]:
        assert hp.check(hp.default), hp.name


def test_a_group_carries_every_key_of_its_parts_with_the_declared_defaults():
    w = nn.Parameter(torch.zeros(8, 4))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "refresh": "adaptive", "proj_method": "randomized_svd"}])
    group = opt.param_groups[0]
    parts = group_parts(group)
    assert defaults(*parts.all()).items() - {"update_proj_gap": 200}.items() <= group.items()
    assert (group["queue_size"], group["cos_threshold"], group["oversample"], group["proj_bits"]) == (5, 0.4, 10, None)


def test_named_optimizers_defaults_win_over_the_declarations():
    w = nn.Parameter(torch.zeros(8, 4))
    dct = DCTAdamW([{"params": [w], "rank": 2}]).param_groups[0]
    assert (dct["proj_method"], dct["update_proj_gap"], dct["scale"], dct["dct_score"]) == ("dct", 1, 1.0, "l1")
    q = QGaLoreAdamW8bit([{"params": [nn.Parameter(torch.zeros(8, 4))], "rank": 2}]).param_groups[0]
    assert (q["rule"], q["refresh"], q["proj_bits"], q["min_8bit_size"]) == ("adam8bit", "adaptive", 4, 4096)


def test_unknown_constructor_key_is_refused_naming_it_and_the_allowed_keys():
    with pytest.raises(
        ValueError,
        match=r"Invalid hyperparameter of GaLoreAdamW: 'gap' \(allowed: lr, betas, .*"
        r"update_proj_gap",
    ):
        GaLoreAdamW([nn.Parameter(torch.zeros(4, 4))], gap=3)


def test_a_group_key_that_none_of_its_parts_declares_is_refused():
    w = nn.Parameter(torch.zeros(8, 4))
    parts = "rule='adam', proj_method='svd', refresh='fixed', update_form='projected'"
    with pytest.raises(ValueError, match=f"key for {parts}: 'oversample'"):
        GaLoreAdamW([{"params": [w], "rank": 2, "oversample": 4}])  # a key of the randomized SVD
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "proj_method": "randomized_svd", "oversample": 4}])
    assert opt.param_groups[0]["oversample"] == 4
    with pytest.raises(ValueError, match="queue_size"):
        GaLoreAdamW([{"params": [w], "rank": 2, "queue_size": 3}])  # a key of the adaptive schedule


def test_keys_lr_schedulers_and_trainers_keep_in_a_group_are_carried_not_refused():
    w = nn.Parameter(torch.zeros(8, 4))
    groups = [{"params": [w], "rank": 2, "initial_lr": 0.01, "max_lr": 0.1, "min_lr": 1e-4, "name": "attention"}]
    opt = GaLoreAdamW(groups, lr=0.01)
    group = opt.param_groups[0]
    assert (group["initial_lr"], group["max_lr"], group["min_lr"], group["name"]) == (0.01, 0.1, 1e-4, "attention")
    # a scheduler resumed mid-run reads initial_lr from the groups as built
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, last_epoch=4)
    assert scheduler.base_lrs == [0.01]
    with pytest.raises(ValueError, match="'initial_lrs'"):  # a typo of one is still refused
        GaLoreAdamW([{"params": [w], "rank": 2, "initial_lrs": 0.01}])


def test_a_named_optimizer_refuses_a_part_it_fixes_and_says_so():
    w = nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(
        ValueError,
        match=r"Invalid proj_method: 'svd' .*DCTAdamW \(dct_adamw\) fixes "
        r"proj_method='dct'",
    ):
        DCTAdamW([w], rank=2, proj_method="svd")
    with pytest.raises(ValueError, match=r"fixes rule='adam'"):
        GaLoreAdamW([{"params": [w], "rank": 2, "rule": "adafactor"}])
    with pytest.raises(ValueError, match=r"dct_adamw\) fixes proj_method='dct'"):
        build_optimizer("dct_adamw", _model(), rank=4, proj_method="svd")


def test_named_optimizers_accept_every_key_of_their_parts_through_the_registry():
    opt = build_optimizer("q_galore_adamw8bit", _model(), rank=4, refresh="fixed")
    low = next(g for g in opt.param_groups if g.get("rank") is not None)
    assert (low["refresh"], low["rule"], low["proj_bits"]) == ("fixed", "adam8bit", 4)
    opt = build_optimizer(
        "galore_adamw",
        _model(),
        rank=4,
        proj_method="randomized_svd",
        power_iters=1,
        refresh="adaptive",
        max_gap=500,
        proj_bits=8,
    )
    low = next(g for g in opt.param_groups if g.get("rank") is not None)
    assert (low["power_iters"], low["max_gap"], low["proj_bits"]) == (1, 500, 8)
    opt = build_optimizer("muon", _model(), rank=2, proj_method="dct", dct_score="l2")
    assert opt.param_groups[-1]["dct_score"] == "l2" and opt.param_groups[-1]["rule"] == "muon"


def test_registry_routes_every_low_rank_key_the_parts_declare():
    keys = set(lowrank_hparams())
    assert {
        "rank",
        "scale",
        "proj_method",
        "refresh",
        "proj_type",
        "update_proj_gap",
        "proj_bits",
        "proj_group_size",
        "oversample",
        "power_iters",
        "dct_score",
        "queue_size",
        "max_gap",
    } <= keys
    assert "lr" not in keys and "seed" not in keys
    with pytest.raises(ValueError, match="oversample given for optimizer 'adamw'"):
        build_optimizer("adamw", _model(), oversample=4)


@pytest.mark.parametrize("cls", NAMED, ids=lambda c: c.__name__)
def test_help_lists_every_hyperparameter_with_its_default(cls):
    doc = cls.__doc__
    shown = {
        **{hp.name: hp.default for hp in ENGINE_HPARAMS},
        **{k: c[0] for k, c in cls.part_choices.items()},
        **cls.named_defaults,
    }
    for name in group_parts(shown).hparams():
        assert f"``{name}`` = " in doc, name
    for name in ("proj_method", "refresh", "seed", "rank", "update_proj_gap", "queue_size", "max_gap"):
        assert f"``{name}`` = " in doc, name


def test_help_shows_the_named_optimizers_own_defaults():
    assert "``update_proj_gap`` = 1:" in DCTAdamW.__doc__ and "``proj_method`` = 'dct' (fixed)" in DCTAdamW.__doc__
    assert "``refresh`` = 'adaptive':" in QGaLoreAdamW8bit.__doc__
    assert "``lr`` = 0.24:" in lowmem_optim.AuON.__doc__ and "``ns_dtype`` = 'auto':" in lowmem_optim.Muon.__doc__


def test_cli_flags_are_the_declared_low_rank_keys_with_their_docs_and_checks(tmp_path):
    from train.config import TrainConfig, build_parser, parse_args

    fields = {f for f in TrainConfig.__dataclass_fields__}
    assert set(lowrank_hparams()) <= fields
    helps = {a.dest: a.help for a in build_parser()._actions}
    hp = lowrank_hparams()["cos_threshold"]
    assert helps["cos_threshold"].startswith(hp.doc) and hp.check.allowed in helps["cos_threshold"]
    cfg = parse_args(
        [
            "--model-config",
            "x.json",
            "--refresh",
            "adaptive",
            "--cos-threshold",
            "0.5",
            "--dct-keep-moments=False",
            "--max-gap",
            "None",
        ]
    )
    assert (cfg.refresh, cfg.cos_threshold, cfg.dct_keep_moments, cfg.max_gap) == ("adaptive", 0.5, False, None)
    with pytest.raises(ValueError, match=r"Invalid --cos-threshold: 1.5 \(allowed: a number in \[0, 1\]\)"):
        parse_args(["--model-config", "x.json", "--cos-threshold", "1.5"])


def test_cli_passes_a_declared_flag_to_the_low_rank_group():
    from train.config import parse_args
    from train.optim import make_optimizer

    cfg = parse_args(
        [
            "--model-config",
            "x.json",
            "--optimizer",
            "galore_adamw",
            "--rank",
            "2",
            "--proj-method",
            "randomized_svd",
            "--oversample",
            "3",
            "--target-modules",
            "0",
        ]
    )
    opt = make_optimizer(cfg, _model())
    low = next(g for g in opt.param_groups if g.get("rank") is not None)
    assert (low["proj_method"], low["oversample"], low["seed"]) == ("randomized_svd", 3, 0)


@pytest.mark.parametrize("proj_method", sorted(PROJECTORS))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_memory_model_counts_what_each_part_reports_and_that_is_the_real_state(rule, proj_method):
    """lowmem_optim.tools.memory asks the parts for their bytes; after a few steps (adaptive queue full,
    8-bit moments, INT4 bases) those are the bytes of the real state tensors."""
    from lowmem_optim.tools.memory_optimizer import optimizer_memory

    torch.manual_seed(0)
    low, full = nn.Parameter(torch.randn(24, 40)), nn.Parameter(torch.randn(8, 6))
    lowrank = {"rank": 4, "proj_method": proj_method, "refresh": "adaptive", "update_proj_gap": 1, "queue_size": 2}
    if PROJECTORS[proj_method]().storage is not None:
        lowrank["proj_bits"] = 4
    extra = {"adam8bit": {"min_8bit_size": 0}, "adafactor": {"relative_step": False, "lr": 1e-3}}.get(rule, {})
    opt = ComposedOptimizer([{"params": [low], **lowrank}, {"params": [full]}], {"rule": rule, **extra})
    for _ in range(3):
        low.grad, full.grad = torch.randn(24, 40), torch.randn(8, 6)
        opt.step()
    real = {"proj": 0, "state": 0}
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                real["proj" if key.startswith("proj_") else "state"] += value.numel() * value.element_size()
    predicted = optimizer_memory("", opt)
    projector = group_parts(opt.param_groups[0]).projector
    shared = sum(projector.shared_bytes((24, 40), torch.float32, opt.param_groups[0]).values())
    assert predicted["optimizer_states"] == real["state"]
    assert predicted["projections"] - shared == real["proj"]
