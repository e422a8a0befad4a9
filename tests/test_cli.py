"""The ``lowmem-optim`` console script (:mod:`lowmem_optim.tools.cli`): one JSON object with every
component, bad input named by its flag, and no import of the training loop (not installed); the
``traffic`` command's prediction for every optimizer that steps FSDP2-sharded parameters."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_optim.registry import available_optimizers
from lowmem_optim.tools.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "llama_tiny.json"


def test_cli_prints_one_json_object_with_every_component(capsys):
    code = main(
        [
            "memory",
            "--model-config",
            str(TINY),
            "--optimizer",
            "galore_adamw8bit",
            "--rank",
            "8",
            "--weight-bits",
            "8",
            "--proj-bits",
            "4",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--activation-checkpointing",
            "--layerwise",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    parts = [k for k in result if k.endswith("_bytes") and k != "total_bytes"]
    assert {
        "weights_bytes",
        "gradients_bytes",
        "optimizer_states_bytes",
        "projections_bytes",
        "activations_bytes",
    } <= set(parts)
    static = result["weights_bytes"] + result["optimizer_states_bytes"] + result["projections_bytes"]
    # the peak is one moment of the step: never less than the static part plus the activations'
    # start of backward, never more than every component at once
    assert static + result["activations_bytes"] <= result["total_bytes"] <= sum(result[k] for k in parts)


def test_cli_reports_bad_input_naming_the_flag(capsys):
    assert (
        main(
            [
                "memory",
                "--model-config",
                str(TINY),
                "--optimizer",
                "adamw",
                "--rank",
                "8",
                "--batch-size",
                "1",
                "--seq-len",
                "8",
            ]
        )
        == 2
    )
    assert "rank" in capsys.readouterr().err
    assert (
        main(["memory", "--model-config", "nope.json", "--optimizer", "adamw", "--batch-size", "1", "--seq-len", "8"])
        == 2
    )
    assert "--model-config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "memory",
                "--model-config",
                str(TINY),
                "--optimizer",
                "adamw",
                "--weight-bits",
                "4",
                "--batch-size",
                "1",
                "--seq-len",
                "8",
            ]
        )


def test_the_console_script_runs_where_the_training_package_cannot_be_imported(tmp_path):
    blocked = (
        "import sys; sys.modules['train'] = None; from lowmem_optim.tools.cli import main; "
        f"sys.exit(main(['memory', '--model-config', {str(TINY)!r}, '--optimizer', 'galore_adamw', "
        "'--rank', '8', '--batch-size', '1', '--seq-len', '8', '--json']))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", blocked], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total_bytes"] > 0


def test_cli_refuses_a_total_batch_size_of_zero_as_the_training_cli_does(capsys):
    argv = ["memory", "--model-config", str(TINY), "--optimizer", "adamw", "--batch-size", "2", "--seq-len", "8"]
    assert main([*argv, "--total-batch-size", "0"]) == 2
    assert "Invalid total_batch_size: 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, value, refusal",
    [
        ("num_hidden_layers", 10**12, r"num_hidden_layers is 1000000000000 \(allowed: at most 10000\)"),
        ("hidden_size", 2**40, r"the model would have about \d\.\d+e\+\d+ parameters \(allowed: at most 1e\+14"),
    ],
)
def test_cli_refuses_an_absurd_model_size_at_once_naming_the_key(tmp_path, capsys, key, value, refusal):
    config = {**json.loads(TINY.read_text()), key: value, "head_dim": 16}
    (tmp_path / "huge.json").write_text(json.dumps(config))
    argv = ["memory", "--model-config", str(tmp_path / "huge.json"), "--optimizer", "adamw", "--batch-size", "1"]
    assert main([*argv, "--seq-len", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(refusal, err), err


def test_momentum_dtype_shrinks_muons_predicted_state_and_is_refused_where_no_momentum_is_stored(capsys):
    argv = ["memory", "--model-config", str(TINY), "--batch-size", "2", "--seq-len", "8", "--json"]
    states = {}
    for dtype in ("auto", "bfloat16", "8bit", "4bit"):
        assert main([*argv, "--optimizer", "muon", "--weight-bits", "32", "--momentum-dtype", dtype]) == 0
        states[dtype] = json.loads(capsys.readouterr().out)["optimizer_states_bytes"]
    assert states["auto"] > states["bfloat16"] > states["8bit"] > states["4bit"] > 0
    assert main([*argv, "--optimizer", "sinkgd", "--momentum-dtype", "8bit"]) == 2
    assert "--momentum-dtype 8bit with --optimizer sinkgd" in capsys.readouterr().err


def _traffic(capsys, *flags: str) -> tuple[int, str, str]:
    code = main(["traffic", "--model-config", str(TINY), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_traffic_predicts_every_sharding_optimizer_with_counts_worked_by_hand(capsys):
    code, out, _ = _traffic(capsys, "--world", "2", "--rank", "8", "--json")
    assert code == 0
    result = json.loads(out)
    expected = sorted(set(available_optimizers()) - {"adamw", "adamw8bit"})
    assert sorted(result["optimizers"]) == expected
    # the tiny config (hidden 64, MLP 176, 2 layers, vocab 512): 166208 float32 parameters, half of
    # whose bytes a rank sends to gather them all; Muon gathers its momentum of the 14 linear
    # weights (2 x (4 x 64 x 64 + 3 x 64 x 176) values)
    assert result["naive_bytes"] == 4 * 166208 / 2
    muon = result["optimizers"]["muon"]
    assert muon["step_bytes"] == muon["refresh_bytes"] == muon["later_refresh_bytes"] == 4 * 2 * 50176 / 2
    # GaLore at rank 8: only down_proj (64 x 176) is projected on the left: R (8 x 176) all-reduced
    # (5632 bytes sent) and the update of each rank's 4 rows gathered (2816), in each of 2 layers
    galore = result["optimizers"]["galore_adamw"]
    assert galore["step_bytes"] == 2 * (5632 + 2816)
    assert galore["left_split"]["split"] and galore["step_bytes"] < galore["refresh_bytes"]
    dct = result["optimizers"]["dct_adamw"]  # a later refresh moves the split moments to the new indices
    assert dct["later_refresh_bytes"] > dct["refresh_bytes"] > dct["step_bytes"]


def test_traffic_prints_markdown_tables_of_the_chosen_optimizers(capsys):
    code, out, _ = _traffic(capsys, "--world", "4", "--rank", "8", "--optimizer", "galore_adamw", "muon")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith(("| galore_adamw |", "| muon |"))]
    # the step table for both, the left-split table for GaLore (Muon projects nothing); on 4 ranks an
    # all-reduce of B bytes sends 1.5 B, an all-gather 0.75 B: GaLore 2 x (1.5 + 0.75) x 5632 bytes,
    # Muon 0.75 x 4 x 100352
    assert len(rows) == 3 and "4 ranks" in out
    assert rows[0].startswith("| galore_adamw | 24.8 KiB |") and rows[1].startswith("| muon | 294.0 KiB |")


@pytest.mark.parametrize(
    "flags, refusal",
    [
        (("--world", "1", "--rank", "8"), "--world 1"),
        (("--world", "2", "--rank", "0"), "--rank 0"),
        (("--world", "2", "--rank", "100"), "--rank"),
    ],
)
def test_traffic_refuses_bad_input_naming_the_flag(capsys, flags, refusal):
    code, _, err = _traffic(capsys, *flags)
    assert code == 2 and refusal in err, err


def test_traffic_refuses_optimizers_that_do_not_step_sharded_parameters():
    with pytest.raises(SystemExit):
        main(["traffic", "--model-config", str(TINY), "--world", "2", "--rank", "8", "--optimizer", "adamw"])
