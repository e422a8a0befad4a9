"""The training CLI's flags (:mod:`train.config`): every spelling the tools use parses alike, and
the parser refuses bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import TrainConfig, parse_args

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "llama_tiny.json")


def test_key_value_snake_and_kebab_spellings_parse_alike():
    kebab = parse_args(
        [
            "--model-config",
            TINY,
            "--update-proj-gap",
            "50",
            "--activation-checkpointing",
            "--rank",
            "4",
            "--optimizer",
            "galore_adamw",
            "--lr",
            "0.002",
        ]
    )
    wandb_form = parse_args(
        [
            f"--model-config={TINY}",
            "--update-proj-gap=50",
            "--activation-checkpointing=True",
            "--rank=4",
            "--optimizer=galore_adamw",
            "--lr=0.002",
        ]
    )
    snake = parse_args(
        [
            f"--model_config={TINY}",
            "--update_proj_gap=50",
            "--activation_checkpointing",
            "True",
            "--rank",
            "4",
            "--optimizer",
            "galore_adamw",
            "--lr",
            "2e-3",
        ]
    )
    assert kebab == wandb_form == snake
    assert kebab.activation_checkpointing is True and kebab.update_proj_gap == 50 and kebab.lr == 0.002


def test_false_and_none_values_as_wandb_renders_them():
    cfg = parse_args(
        [f"--model-config={TINY}", "--progress=False", "--layerwise=false", "--rank=None", "--total-batch-size=null"]
    )
    assert cfg.progress is False and cfg.layerwise is False and cfg.rank is None and cfg.total_batch_size is None
    assert parse_args([f"--model-config={TINY}"]) == TrainConfig(model_config=TINY)


def test_a_bad_boolean_or_unknown_flag_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        parse_args([f"--model-config={TINY}", "--layerwise=maybe"])
    with pytest.raises(SystemExit):
        parse_args([f"--model-config={TINY}", "--no-such-flag=1"])


@pytest.mark.parametrize(
    "flag, value",
    [("--grad-clip", "nan"), ("--grad-clip", "inf"), ("--weight-decay", "inf"), ("--weight-decay", "nan")],
)
def test_a_non_finite_clip_or_weight_decay_is_refused_naming_the_flag(flag, value):
    """NaN compares false with everything: `--grad-clip nan` passed `< 0` and turned clipping off."""
    with pytest.raises(ValueError, match=rf"^Invalid {flag}: {value} \(allowed: a finite number >= 0\)"):
        parse_args(["--model-config", TINY, flag, value])
