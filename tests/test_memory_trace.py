"""The storage trace (lowmem_optim.tools.memory_trace), the INT8 layer under FakeTensorMode, and the memory
model held to the trace of each 7B recipe's settings at small shapes (train.memory_trace)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from lowmem_optim.quant.int8_linear import Int8Linear, Int8Weight
from lowmem_optim.tools.memory_trace import StorageTrace, fake_tensors
from tests.helpers.scripts import script_config
from train.config import parse_args
from train.memory_trace import trace_training

SMALL = "configs/llama_small.json"


def test_trace_counts_each_storage_once_until_freed_and_splits_the_peak():
    model = nn.Linear(64, 32, bias=False)
    trace = StorageTrace()
    trace.watch(model)
    x = torch.randn(16, 64)
    with trace:
        trace.phase("step")
        y = model(x)  # 16 x 32 float32: an activation
        view = y[:4]  # a view: no new storage
        y.sum().backward()  # the gradient, 32 x 64
        del view, y
        temporary = torch.ones(1000)  # made outside any forward, alive at the peak
        del temporary
    peaks = trace.finish()
    step = peaks["step"]
    assert step.split["parameters"] == 64 * 32 * 4
    assert step.split["gradients"] == 64 * 32 * 4
    assert step.bytes == sum(step.split.values())
    assert trace.live_bytes == 2 * 64 * 32 * 4  # the weight and its gradient; x was never followed
    assert step.bytes >= 2 * 64 * 32 * 4 + 1000 * 4


def test_host_reads_of_valueless_tensors_get_stand_ins_and_small_host_data_keeps_its_values():
    trace = StorageTrace()
    with fake_tensors():
        g = torch.randn(8, 8)
        meta = torch.tensor([3, 5, 4, 256])
        with trace:
            finite = bool(torch.isfinite(g).all())
            shape = [int(v) for v in meta]
    assert finite and shape == [3, 5, 4, 256]
    assert trace.host_reads["_local_scalar_dense"] >= 1


def test_int8_layer_trains_under_fake_tensor_mode():
    # nn.Parameter of a FakeTensor returns the FakeTensor: the weight keeps INT8's methods
    with fake_tensors():
        layer = Int8Linear.from_linear(nn.Linear(512, 256, bias=False, dtype=torch.bfloat16))
        x = torch.randn(4, 512, dtype=torch.bfloat16, requires_grad=True)
        layer(x).sum().backward()
        layer.weight.apply_update(layer.weight.grad.float(), alpha=0.1, seed=1)
        assert isinstance(layer.weight, Int8Weight)
        assert layer.weight.grad.shape == (256, 512) and x.grad.shape == x.shape
        assert layer.weight_codes.dtype == torch.uint8


@pytest.mark.parametrize("card, small_rank", [("12", 16), ("16", 64), ("24", 64)])
def test_memory_model_is_within_5_percent_of_the_trace_for_each_7b_recipe_at_small_shapes(tmp_path, card, small_rank):
    # the recipe's own flags (optimizer, weight bits, buffers, layer-wise, checkpointing), on a
    # 4-layer LLaMA with its rank scaled as hidden / 4096 and 4 micro-batches per step
    cfg = script_config(tmp_path, "7b", GPU_MEMORY=card)
    assert cfg.rank * 256 // 4096 == small_rank
    small = dataclasses.replace(
        cfg, model_config=SMALL, rank=small_rank, batch_size=4, total_batch_size=16, seq_len=128
    )
    result = trace_training(small)
    predicted = result["predicted"]["total_bytes"]
    assert abs(predicted / result["peak_bytes"] - 1) <= 0.05, result
    assert result["peak_split"]["optimizer_states"] > 0 and result["peak_split"]["accumulation_buffers"] > 0


#: setups off the recipes' path, each with the vocabulary it runs at, each predicted 10-22%
#: off: the head's and the embedding's 8-bit Adam chunks (4M values: a vocabulary of 32,000 at
#: width 256 makes 8.2M), the logits the loop frees with the output, every gradient held from the
#: second micro-batch without --layerwise (layers heavier than the head: llama_small's own 512)
Q_GALORE = "--optimizer q_galore_adamw8bit --rank 64 --weight-bits 8 --proj-bits 4 --dtype bfloat16 --layerwise"
OTHER_SETUPS = {
    "q-galore-int8-layerwise-unchunked": (
        32000,
        f"{Q_GALORE} --activation-checkpointing --batch-size 4 --seq-len 64 --loss-chunk-tokens 0",
    ),
    "q-galore-int8-layerwise-chunked": (
        32000,
        f"{Q_GALORE} --activation-checkpointing --batch-size 4 --seq-len 64 --loss-chunk-tokens 64",
    ),
    "galore-layerwise-unchunked": (
        32000,
        "--optimizer galore_adamw --rank 64 --layerwise --batch-size 8 --seq-len 128 --loss-chunk-tokens 0",
    ),
    "adamw-float32-unchunked": (
        32000,
        "--optimizer adamw --dtype float32 --batch-size 8 --seq-len 128 --loss-chunk-tokens 0",
    ),
    "adamw-accumulated": (512, "--optimizer adamw --dtype bfloat16 --batch-size 4 --total-batch-size 8 --seq-len 64"),
    # INT8 linear layers under float32 compute (the training CLI's default dtype)
    "galore-int8-float32": (512, "--optimizer galore_adamw --rank 64 --weight-bits 8 --batch-size 4 --seq-len 64"),
}


@pytest.mark.parametrize(("vocab_size", "flags"), OTHER_SETUPS.values(), ids=OTHER_SETUPS.keys())
def test_memory_model_is_within_5_percent_of_the_trace_off_the_recipes_path(tmp_path, vocab_size, flags):
    # llama_small (4 layers, width 256); at LLaMA's vocabulary of 32,000 the head and the loss
    # weigh against the layers as at 7B
    config = {**json.loads(open(SMALL).read()), "vocab_size": vocab_size}
    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = [*flags.split(), "--model-config", str(tmp_path / "config.json"), "--output-dir", str(tmp_path)]
    result = trace_training(parse_args(argv))
    assert abs(result["predicted"]["total_bytes"] / result["peak_bytes"] - 1) <= 0.05, result


def test_the_module_traces_the_run_its_training_flags_describe_and_writes_the_json(tmp_path, capsys):
    from train.memory_trace import main

    flags = ["--model-config", "configs/llama_tiny.json", "--optimizer", "galore_adamw", "--rank", "8", "--layerwise"]
    flags += ["--batch-size", "2", "--total-batch-size", "8", "--seq-len", "16", "--output-dir", str(tmp_path)]
    result = main(flags)
    written = json.loads((tmp_path / "memory_trace.json").read_text())
    assert written["peak_bytes"] == result["peak_bytes"] > 0 and written["micro_batches"] == 3
    assert written["config"]["layerwise"] and written["config"]["rank"] == 8
    assert f"traced peak {result['peak_bytes'] / 2**30:.3f} GiB" in capsys.readouterr().out
