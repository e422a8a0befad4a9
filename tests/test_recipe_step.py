"""The probe of a recipe's step (scripts/bench/recipe_step.py) on CPU: what it measures and what it refuses."""

from __future__ import annotations

import json

import pytest

from scripts.bench.recipe_step import main
from tests.helpers.tiny_run import TINY

FLOAT32_TINY = ["--model-config", TINY, "--dtype", "float32", "--optimizer", "adamw", "--batch-size", "2"]


def test_the_counted_step_holds_the_loss_tensors_of_the_replaced_vocabulary_and_its_line_is_appended(tmp_path):
    argv = [*FLOAT32_TINY, "--seq-len", "32", "--device", "cpu", "--cpu-peak", "step", "--vocab-size", "8192"]
    result = main([*argv, "--max-steps", "2", "--output-dir", str(tmp_path)])
    # the float32 log-softmax and its two gradients at the start of backward (llama_tiny has 512 ids)
    loss_tensors = 12 * 2 * 32 * 8192
    assert result["ours"]["peak_tensor_bytes"] >= loss_tensors
    # the resident set's growth: 0 where the allocator reuses memory an earlier test freed (the
    # probe's figure needs a fresh process; tests/test_bench_toolkit.py checks peak_rss_above)
    assert isinstance(result["ours"]["peak_rss_bytes"], int)
    assert result["ours"]["step_s"] is None  # two steps: the first alone, the second counted, none timed
    assert result["predicted_over_measured"] == result["predicted"]["step_bytes"] / result["ours"]["peak_tensor_bytes"]
    assert json.loads((tmp_path / "recipe_step.jsonl").read_text()) == json.loads(json.dumps(result))


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--device", "cuda", "--cpu-peak", "step"], "--cpu-peak"),
        (["--cpu-peak", "step", "--max-steps", "1"], "--max-steps"),
    ],
)
def test_a_cpu_peak_needs_the_cpu_and_a_step_before_it(tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit):
        main([*FLOAT32_TINY, "--device", "cpu", *flags, "--output-dir", str(tmp_path)])
    assert f"Invalid {named}" in capsys.readouterr().err
