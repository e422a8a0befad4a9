"""The run's optimizer (:mod:`train.optim`) from the CLI's Adam flags: ``--betas beta1,beta2`` (or
``--beta1``/``--beta2``) and ``--eps`` reach every Adam group, checked by the Adam rule's
declarations; an optimizer whose eps is not Adam's refuses ``--eps`` by name. ``--momentum-dtype``
reaches the matrix groups of Muon, AuON and Hybrid-AuON and is refused elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.config import parse_args
from train.model import build_model
from train.optim import make_optimizer

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "llama_tiny.json")


def tiny() -> torch.nn.Module:
    return build_model(TINY, dtype=torch.float32, device=torch.device("cpu"), seed=0, vocab_needed=256, seq_len=32)


def optimizer(*flags: str) -> torch.optim.Optimizer:
    return make_optimizer(parse_args([f"--model-config={TINY}", *flags]), tiny())


@pytest.mark.parametrize("name", ["adamw", "galore_adamw", "galore_adamw8bit", "q_galore_adamw8bit", "dct_adamw"])
def test_betas_and_eps_reach_every_group(name):
    low = ["--rank=8"] if name != "adamw" else []
    opt = optimizer(f"--optimizer={name}", "--betas=0.9,0.95", "--eps=1e-6", *low)
    assert {(tuple(g["betas"]), g["eps"]) for g in opt.param_groups} == {((0.9, 0.95), 1e-6)}


def test_beta2_alone_keeps_adams_beta1_and_equals_the_betas_form():
    single = optimizer("--optimizer=galore_adamw", "--rank=8", "--beta2=0.95")
    pair = optimizer("--optimizer=galore_adamw", "--rank=8", "--betas=0.9,0.95")
    assert [g["betas"] for g in single.param_groups] == [g["betas"] for g in pair.param_groups] == [(0.9, 0.95)] * 2


def test_unset_flags_leave_the_optimizers_defaults():
    opt = optimizer("--optimizer=galore_adamw", "--rank=8")
    assert {(g["betas"], g["eps"]) for g in opt.param_groups} == {((0.9, 0.999), 1e-8)}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--betas=0.9"], "Invalid --betas: (0.9,) (allowed: a pair of numbers in [0, 1))"),
        (["--betas=0.9,1.0"], "Invalid --betas: (0.9, 1.0)"),
        (
            ["--betas=high,low"],
            "Invalid --betas: 'high,low' (allowed: a pair of numbers in [0, 1), written beta1,beta2)",
        ),
        (["--betas=0.9,0.95", "--beta2=0.9"], "--betas '0.9,0.95' and --beta1/--beta2 both given"),
        (["--beta1=1.5"], "Invalid --beta1/--beta2: (1.5, 0.999)"),
        (["--eps=-1e-8"], "Invalid --eps: -1e-08 (allowed: a finite number >= 0)"),
    ],
)
def test_bad_adam_flags_name_the_flag_and_what_is_allowed(flags, message):
    with pytest.raises(ValueError) as err:
        parse_args([f"--model-config={TINY}", *flags])
    assert message in str(err.value)


def test_eps_for_adafactor_whose_eps_is_a_pair_is_refused_by_name():
    with pytest.raises(ValueError, match=r"Invalid eps: 1e-06 \(allowed: a pair"):
        optimizer("--optimizer=galore_adafactor", "--rank=8", "--eps=1e-6")


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
@pytest.mark.parametrize("name", ["muon", "auon", "hybrid_auon"])
def test_momentum_dtype_reaches_the_matrix_groups(name, kind):
    opt = optimizer(f"--optimizer={name}", f"--momentum-dtype={kind}")
    assert [g["momentum_dtype"] for g in opt.param_groups if g["rule"] == name] == [kind]


def test_momentum_dtype_is_refused_by_name_where_it_means_nothing_or_is_not_a_storage():
    with pytest.raises(ValueError, match=r"--momentum-dtype 8bit with --optimizer adamw.*allowed: --optimizer auon"):
        optimizer("--optimizer=adamw", "--momentum-dtype=8bit")
    with pytest.raises(ValueError, match=r"--momentum-dtype bfloat16 with --optimizer sinkgd.*allowed: .*muon\)"):
        optimizer("--optimizer=sinkgd", "--momentum-dtype=bfloat16")
    with pytest.raises(
        ValueError, match=r"Invalid --momentum-dtype: 'int8' \(allowed: auto, float32, bfloat16, 8bit, 4bit\)"
    ):
        parse_args([f"--model-config={TINY}", "--momentum-dtype=int8"])


def test_apollo_mini_needs_no_rank_flag_its_low_rank_group_is_rank_1():
    assert [g.get("rank") for g in optimizer("--optimizer=apollo_mini").param_groups] == [None, 1]
    assert [g.get("rank") for g in optimizer("--optimizer=apollo_mini", "--rank=4").param_groups] == [None, 4]


@pytest.mark.parametrize(
    ("name", "flag", "key", "default"),
    [
        ("dct_adamw", "error-feedback", "error_feedback", "nf4"),
        ("fira", "norm-growth-limit", "norm_growth_limit", 1.01),
        ("apollo", "norm-growth-limit", "norm_growth_limit", 1.01),
        ("q_galore_adamw8bit", "proj-bits", "proj_bits", 4),
    ],
)
def test_none_given_turns_off_what_the_optimizer_defaults_to_and_unset_keeps_it(name, flag, key, default):
    """``--error-feedback none`` turns DCTAdamW's NF4 feedback off (as ``DCTAdamW(error_feedback=None)``),
    where unset leaves it on; the same for the limiter of APOLLO and Fira and Q-GaLore's INT4 projections.
    The memory model of the run follows the flag."""
    from lowmem_optim.tools.llama_config import load_llama_config
    from lowmem_optim.tools.memory import estimate_memory
    from train.memory_trace import training_setup

    def lowrank_value(*flags: str):
        opt = optimizer(f"--optimizer={name}", "--rank=8", *flags)
        return next(g[key] for g in opt.param_groups if g.get("rank") is not None)

    assert lowrank_value() == default
    assert lowrank_value(f"--{flag}=none") is None and lowrank_value(f"--{flag}", "None") is None
    unset, off = (
        parse_args([f"--model-config={TINY}", f"--optimizer={name}", "--rank=8", *f]) for f in ([], [f"--{flag}=none"])
    )
    assert off.lowrank_flags() == {"rank": 8, key: None} and unset.lowrank_flags() == {"rank": 8}
    config = load_llama_config(TINY)
    assert estimate_memory(config, training_setup(off)) != estimate_memory(config, training_setup(unset))


def test_none_is_unset_for_rank_and_for_flags_whose_default_is_none():
    cfg = parse_args([f"--model-config={TINY}", "--optimizer=muon", "--rank=None", "--error-feedback=none"])
    assert cfg.rank is None and cfg.lowrank_flags() == {"error_feedback": None}
    assert all(
        g.get("rank") is None and g.get("error_feedback") is None for g in make_optimizer(cfg, tiny()).param_groups
    )
