"""Memory model: weights, gradients, optimizer states and projections predicted exactly against
the bytes of a real tiny LLaMA's tensors after a step (CPU), and the 7B recipe's prediction."""

from __future__ import annotations

import dataclasses
import json
import weakref
from pathlib import Path

import pytest
import torch

from lowmem_optim import SCALE, GaLoreAdamW, SinkGD, build_optimizer
from lowmem_optim.projection import dct
from lowmem_optim.quant.int8_linear import Int8Weight, quantize_linear_layers
from lowmem_optim.tools.memory import TrainingSetup, estimate_memory
from lowmem_optim.tools.memory_optimizer import optimizer_memory
from lowmem_optim.tools.op_count import OpCounter
from tests.helpers.scripts import script_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = CONFIGS / "llama_tiny.json"
LOWRANK = {"galore_adamw", "galore_adamw8bit", "q_galore_adamw8bit", "fira", "apollo", "apollo_mini"}
#: low-rank optimizers that store no basis (a random projection regenerated from a seed)
BASIS_FREE = {"apollo", "apollo_mini"}


def tiny_config() -> dict:
    return json.loads(TINY.read_text())


def measured_bytes(setup: TrainingSetup, steps: int) -> dict[str, int]:
    """Build the real model and optimizer as training does, step, and count tensor bytes."""
    from train.model import build_model

    model = build_model(
        str(TINY),
        dtype=setup.torch_dtype(),
        device=torch.device("cpu"),
        seed=0,
        vocab_needed=512,
        seq_len=setup.seq_len,
    )
    if setup.weight_bits == 8:
        quantize_linear_layers(model, setup.target_modules)
    extra = {"rank": setup.rank, "proj_bits": setup.proj_bits} if setup.optimizer in LOWRANK else {}
    opt = build_optimizer(
        setup.optimizer, model, target_modules=setup.target_modules, **extra, **dict(setup.optimizer_kwargs)
    )
    tokens = torch.randint(0, 512, (setup.batch_size, setup.seq_len), generator=torch.Generator().manual_seed(0))
    grads = 0
    for _ in range(steps):
        model(tokens, labels=tokens).loss.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
        opt.step()
        opt.zero_grad()
    weights = sum(
        p.element_size() if isinstance(p, Int8Weight) else p.numel() * p.element_size() for p in model.parameters()
    ) + sum(b.numel() * b.element_size() for b in model.buffers())
    states = proj = 0
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                nbytes = value.numel() * value.element_size()
                proj, states = (proj + nbytes, states) if key.startswith("proj_") else (proj, states + nbytes)
    return {
        "weights_bytes": weights,
        "gradients_bytes": grads,
        "optimizer_states_bytes": states,
        "projections_bytes": proj,
    }


@pytest.mark.parametrize(
    "setup",
    [
        TrainingSetup("adamw", weight_bits=32, batch_size=2, seq_len=16),
        TrainingSetup("galore_adamw", rank=8, weight_bits=16, batch_size=2, seq_len=16),
        # INT8 weights, INT4 projections, adaptive refresh whose similarity queue is full after 2 steps
        TrainingSetup(
            "galore_adamw8bit",
            rank=8,
            weight_bits=8,
            proj_bits=4,
            batch_size=2,
            seq_len=16,
            optimizer_kwargs=(
                ("refresh", "adaptive"),
                ("update_proj_gap", 1),
                ("queue_size", 1),
                ("cos_threshold", 1.0),
            ),
        ),
        # error feedback: the 4-bit buffer of every projected weight (INT4 codes, scale and zero per 256)
        TrainingSetup(
            "galore_adamw",
            rank=8,
            weight_bits=16,
            batch_size=2,
            seq_len=16,
            optimizer_kwargs=(("error_feedback", "4bit"),),
        ),
        # stateless on the hidden matrices (AdamW on the rest), and SCALE's channel momentum
        TrainingSetup("sinkgd", weight_bits=32, batch_size=2, seq_len=16),
        TrainingSetup("scale_sgd", weight_bits=16, batch_size=2, seq_len=16, optimizer_kwargs=(("momentum", 0.9),)),
        # Muon's momentum in 8-bit codes (uint8 + a float32 absmax per 256) and in bfloat16
        TrainingSetup("muon", weight_bits=32, batch_size=2, seq_len=16, optimizer_kwargs=(("momentum_dtype", "8bit"),)),
        TrainingSetup(
            "muon", weight_bits=16, batch_size=2, seq_len=16, optimizer_kwargs=(("momentum_dtype", "bfloat16"),)
        ),
        # and in 4-bit NF4 codes (two per byte + a float32 absmax per 64)
        TrainingSetup("muon", weight_bits=16, batch_size=2, seq_len=16, optimizer_kwargs=(("momentum_dtype", "4bit"),)),
        TrainingSetup("auon", weight_bits=32, batch_size=2, seq_len=16, optimizer_kwargs=(("momentum_dtype", "4bit"),)),
        # the norm-growth limiter's float32 number per projected weight; APOLLO-Mini's form without it
        TrainingSetup("fira", rank=8, weight_bits=16, batch_size=2, seq_len=16),
        TrainingSetup(
            "galore_adamw",
            rank=8,
            weight_bits=32,
            batch_size=2,
            seq_len=16,
            optimizer_kwargs=(("update_form", "tensor"), ("norm_growth_limit", None)),
        ),
        # APOLLO: Adam moments of a random projection and the limiter's number, no basis; APOLLO-Mini at
        # its default rank 1, INT8 weights
        TrainingSetup("apollo", rank=8, weight_bits=16, batch_size=2, seq_len=16),
        TrainingSetup("apollo_mini", weight_bits=8, batch_size=2, seq_len=16),
    ],
    ids=lambda s: "-".join(
        [f"{s.optimizer}-w{s.weight_bits}-p{s.proj_bits}", *(f"{k}={v}" for k, v in s.optimizer_kwargs)]
    ),
)
def test_weights_gradients_states_and_projections_match_real_tensor_bytes(setup):
    predicted = estimate_memory(tiny_config(), setup).as_dict()
    measured = measured_bytes(setup, steps=2)
    assert {k: predicted[k] for k in measured} == measured
    stores_basis = setup.rank is not None and setup.optimizer not in BASIS_FREE
    assert measured["projections_bytes"] > 0 if stores_basis else measured["projections_bytes"] == 0
    assert measured["optimizer_states_bytes"] > 0


def test_layerwise_keeps_one_gradient_and_activation_checkpointing_shrinks_activations():
    base = TrainingSetup("galore_adamw", rank=8, batch_size=4, seq_len=64)
    plain = estimate_memory(tiny_config(), base)
    lw = estimate_memory(tiny_config(), TrainingSetup(**{**base.__dict__, "layerwise": True}))
    ckpt = estimate_memory(tiny_config(), TrainingSetup(**{**base.__dict__, "activation_checkpointing": True}))
    assert lw.gradients_bytes == 512 * 64 * 2 < plain.gradients_bytes  # the embedding's (= head's) gradient
    assert ckpt.activations_bytes < plain.activations_bytes
    double = estimate_memory(tiny_config(), TrainingSetup(**{**base.__dict__, "batch_size": 8}))
    assert double.activations_bytes == 2 * plain.activations_bytes


@pytest.mark.parametrize("card", [12, 16, 24])
def test_llama7b_recipe_of_each_card_is_the_one_fit_chooses_and_is_predicted_within_its_budget(tmp_path, card):
    # scripts/pretrain_llama7b.sh GPU_MEMORY=card: q_galore_adamw8bit, INT4 projections,
    # layer-wise, activation checkpointing, bf16, 512 sequences per update in 8-bit buffers
    from lowmem_optim.tools.memory_fit import budget_bytes, fitting
    from train.memory_trace import training_setup

    cfg = script_config(tmp_path, "7b", GPU_MEMORY=str(card))
    assert (cfg.total_batch_size, cfg.accumulation_buffer, cfg.seq_len) == (512, "8bit", 256)
    config = json.loads((CONFIGS / "llama_7b.json").read_text())
    fit = fitting(config, card, 256, 512)
    setup = training_setup(cfg)  # with the recipe's flags that change no byte (gap, stagger, scale)
    assert dict(setup.optimizer_kwargs) == {"update_proj_gap": 500, "stagger": True, "scale": 0.25}
    assert fit is not None and dataclasses.replace(setup, optimizer_kwargs=()) == fit.setup
    estimate = estimate_memory(config, setup)
    assert estimate == fit.estimate
    assert estimate.total_bytes <= budget_bytes(card)
    if cfg.weight_bits == 8:
        assert 6.5 * 2**30 < estimate.weights_bytes < 7 * 2**30  # 6.5B INT8 linear weights + bf16 embeddings


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [0, 64, 256])
def test_loss_term_is_the_measured_peak_of_the_head_and_loss(dtype, chunk):
    # the head and the loss alone, forward and backward, on CPU: the bytes of the tensors they
    # create (OpCounter follows every new storage until it is freed) against the model's loss
    # term plus the head's gradient; the logits dropped once the loss is computed, as the
    # training loop drops the model's output
    import torch.nn.functional as F

    from lowmem_optim.tools.memory import LlamaShape, activation_memory
    from lowmem_optim.tools.op_count import OpCounter
    from train.loss import chunked_causal_lm_loss

    batch, seq, h, vocab = 4, 256, 64, 4096
    setup = TrainingSetup(
        "adamw",
        weight_bits=32 if dtype == "float32" else 16,
        dtype=dtype,
        batch_size=batch,
        seq_len=seq,
        loss_chunk_tokens=chunk,
    )
    torch_dtype = setup.torch_dtype()
    head = torch.nn.Linear(h, vocab, bias=False, dtype=torch_dtype)
    hidden = torch.randn(batch, seq, h, dtype=torch_dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with OpCounter() as counter:
        if chunk:
            loss = chunked_causal_lm_loss(hidden, head, labels, chunk)
        else:
            loss = F.cross_entropy(head(hidden).float().view(-1, vocab)[:-1], labels.view(-1)[1:])
        loss.backward()
    s = torch.empty((), dtype=torch_dtype).element_size()
    predicted = activation_memory(LlamaShape(vocab, h, 4 * h, 1, 4, 4), setup)["loss"] + s * vocab * h
    if chunk:
        assert abs(counter.peak_bytes / predicted - 1) < 0.02
    else:  # the head's gradient comes after the loss tensors are freed: the sum bounds both
        assert counter.peak_bytes <= predicted < 1.03 * counter.peak_bytes


def test_chunked_loss_drops_the_logits_and_one_chunk_covers_a_small_micro_batch():
    config = json.loads((CONFIGS / "llama_60m.json").read_text())
    base = TrainingSetup("galore_adamw", rank=64, batch_size=8, seq_len=256, loss_chunk_tokens=0)

    def estimate(**changes):
        return estimate_memory(config, TrainingSetup(**{**base.__dict__, **changes}))

    chunked = estimate(loss_chunk_tokens=256)
    assert chunked.activations_bytes < estimate().activations_bytes
    assert chunked.total_bytes < estimate().total_bytes
    assert estimate(loss_chunk_tokens=8 * 256) == estimate()  # one chunk: HF's loss
    # the loss holds one chunk: more tokens add only their per-token terms and the final hidden
    # states' gradient (bf16: 2 h), not 12 V each
    per_token = (estimate(batch_size=16).activations_bytes - estimate().activations_bytes) / (8 * 256)
    chunked_per_token = (
        estimate(batch_size=16, loss_chunk_tokens=256).activations_bytes - chunked.activations_bytes
    ) / (8 * 256)
    assert chunked_per_token == per_token - 12 * config["vocab_size"] + 2 * config["hidden_size"]


@pytest.mark.parametrize("buffer", ["float32", "bfloat16", "8bit", "full"])
def test_layerwise_accumulation_buffers_and_held_gradients_match_real_tensor_bytes(buffer):
    """Layer-wise with 2 micro-batches: after micro-batch 1 the gradients left in .grad are the
    held ones (not projected; all of them with "full"); after the step the handle's buffers are
    what the model predicts."""
    from lowmem_optim import layerwise
    from train.model import build_model

    setup = TrainingSetup(
        "galore_adamw",
        rank=8,
        weight_bits=32,
        batch_size=2,
        seq_len=16,
        layerwise=True,
        total_batch_size=4,
        accumulation_buffer=buffer,
    )
    predicted = estimate_memory(tiny_config(), setup)
    model = build_model(
        str(TINY), dtype=torch.float32, device=torch.device("cpu"), seed=0, vocab_needed=512, seq_len=16
    )
    opt = build_optimizer("galore_adamw", model, target_modules=setup.target_modules, rank=8)
    handle = layerwise.attach(opt, accumulation_steps=2, accumulation_buffer=buffer)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    model(tokens, labels=tokens).loss.backward()
    held = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert predicted.gradients_bytes == held + largest
    model(tokens, labels=tokens).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert predicted.accumulation_buffers_bytes == handle.buffer_bytes()
    assert (handle.buffer_bytes() > 0) == (buffer != "full")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (8, 3, 3, 3)])
@pytest.mark.parametrize(
    ("name", "cls", "kwargs"),
    [("sinkgd", SinkGD, {}), ("scale_sgd", SCALE, {}), ("scale_sgd", SCALE, {"momentum": 0.9})],
    ids=["sinkgd", "scale_sgd", "scale_sgd-momentum"],
)
def test_workspace_of_the_stateless_normalized_rules_is_the_measured_peak(name, cls, kwargs, shape, dtype):
    """SinkGD and SCALE normalize one copy of the gradient in place: the model's workspace is the
    peak of the allocations of a step (tall, wide and conv weights)."""
    p = torch.nn.Parameter(torch.randn(shape, dtype=dtype))
    opt = cls([p], **kwargs)
    for _ in range(2):  # the second step: any momentum exists, the step allocates its temporaries only
        p.grad = torch.randn_like(p)
        with OpCounter() as counter:
            opt.step()
    assert counter.peak_bytes == optimizer_memory(name, opt)["workspace"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(256, 64), (64, 256)], ids=["right", "left"])
def test_update_forms_add_the_measured_temporaries_to_the_workspace(shape, dtype):
    """What each form adds to a projected step's temporaries (Fira's m x n residual; APOLLO's
    per-channel factors, its S taking P N's place), predicted against the peak the step's
    allocations reach (a step without a refresh), relative to the "projected" form."""

    def peaks(form: str) -> tuple[int, int]:
        p = torch.nn.Parameter(torch.randn(shape).to(dtype))
        opt = GaLoreAdamW([{"params": [p], "rank": 8, "update_form": form}], weight_decay=0.1)
        for _ in range(2):
            p.grad = torch.randn_like(p)
            with OpCounter() as counter:
                opt.step()
        return counter.peak_bytes, optimizer_memory("galore_adamw", opt)["workspace"]

    measured_base, predicted_base = peaks("projected")
    for form in ("residual", "channel", "tensor"):
        measured, predicted = peaks(form)
        extra = measured - measured_base
        if form == "tensor":  # two 0-D norms and the factor
            assert predicted == predicted_base and 0 < extra <= 64
        else:
            assert predicted - predicted_base == extra > 0, form


def step_peak_above_start(optimizer: torch.optim.Optimizer) -> int:
    """The peak of the bytes one ``optimizer.step()`` allocates, less those of the state tensors
    it replaces from the moment each is freed (a new DCT index, re-indexed moments, a new error
    buffer take their place): the peak above the memory before the step."""
    counter = OpCounter()

    def release(nbytes: int) -> None:
        counter._live_bytes -= nbytes

    def watch() -> None:  # keeps no reference to the state: a replaced tensor is freed as it is replaced
        for state in optimizer.state.values():
            for t in state.values():
                if torch.is_tensor(t):
                    weakref.finalize(t.untyped_storage(), release, t.untyped_storage().nbytes())

    watch()
    with counter:
        optimizer.step()
    return counter.peak_bytes


PROJECTED_STEPS = [
    ("galore_adamw", {}),
    ("galore_adamw", {"proj_type": "full"}),  # P^T G Q: P N made before it meets Q
    ("galore_adamw", {"proj_method": "random"}),  # Flora: P regenerated on use
    ("galore_adamw", {"error_feedback": "nf4"}),
    ("galore_adamw8bit", {}),
    ("q_galore_adamw8bit", {}),
    ("galore_adafactor", {}),
    ("dct_adamw", {}),  # NF4 error feedback
    ("dct_adamw", {"error_feedback": None}),
    ("dct_adamw", {"error_feedback": "4bit", "dct_fft_threshold": 32}),  # the spectrum from an FFT
    ("dct_adamw", {"error_feedback": "float32"}),
    ("dct_adamw", {"error_feedback": "8bit"}),
    ("fira", {}),
    ("apollo", {}),
    ("apollo_mini", {}),
    ("muon", {}),
    ("muon", {"momentum_dtype": "float32"}),
    ("muon", {"momentum_dtype": "bfloat16"}),
    ("muon", {"momentum_dtype": "8bit"}),
    ("auon", {"momentum_dtype": "4bit"}),
    ("auon", {}),
    ("hybrid_auon", {}),
    ("sinkgd", {}),
    ("scale_sgd", {}),
    ("scale_sgd", {"momentum": 0.9}),
]


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(256, 64), (64, 256)], ids=["right", "left"])
@pytest.mark.parametrize(
    ("name", "kwargs"), PROJECTED_STEPS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values()))
)
def test_workspace_of_one_projected_update_is_the_measured_peak(name, kwargs, shape, dtype, int8):
    """What is alive at the peak of one projected update (R through the whole step, N from the
    rule on, U in the weight's or N's dtype, the regenerated or dequantized basis, the DCT's
    spectrum, A = G + E and E's quantization, the form's terms, an INT8 weight's chunk) is the
    model's workspace, to the byte but for a few 0-D tensors (step size, norms: at most 64
    bytes), at the second step (the first creates the state)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], bias=False)).to(dtype)
    if int8:
        quantize_linear_layers(model, "all-linear", group_size=256)
    opt = build_optimizer(name, model, target_modules="all-linear", rank=8, **kwargs)
    weight = model[0].weight
    for _ in range(2):
        weight.grad = torch.randn(shape, dtype=dtype)
        measured = step_peak_above_start(opt)
    predicted = optimizer_memory(name, opt)["workspace"]
    assert 0 <= measured - predicted <= 64, (measured, predicted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(256, 64), (64, 256)], ids=["right", "left"])
@pytest.mark.parametrize("fft_threshold", [32, 2048], ids=["fft", "matmul"])
def test_the_dct_spectrum_and_scores_in_passes_are_the_one_pass_ones_at_the_modelled_peak(
    monkeypatch, fft_threshold, shape, dtype
):
    """Over a few vectors at a time (10 of the 256 per pass here, as 4M values at LLaMA-7B width),
    the DCT's spectrum and scores are those of one pass, and its refresh's peak is the model's."""
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    dim = 0 if shape[0] < shape[1] else 1
    whole = dct.dct_spectrum(grad, dim, fft_threshold)
    whole_scores = dct.scores(whole, dim, "l1")
    monkeypatch.setattr(dct, "SPECTRUM_CHUNK", 10 * 64)
    assert torch.equal(dct.dct_spectrum(grad, dim, fft_threshold), whole)
    torch.testing.assert_close(dct.scores(whole, dim, "l1"), whole_scores, rtol=1e-6, atol=0)
    model = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], bias=False)).to(dtype)
    opt = build_optimizer(
        "dct_adamw", model, target_modules="all-linear", rank=8, error_feedback=None, dct_fft_threshold=fft_threshold
    )
    for _ in range(2):
        model[0].weight.grad = grad.clone()
        measured = step_peak_above_start(opt)
    predicted = optimizer_memory("dct_adamw", opt)["workspace"]
    assert 0 <= measured - predicted <= 64, (measured, predicted)


@pytest.mark.parametrize(("optimizer", "key"), [("apollo", "update_form='channel'"), ("dct_adamw", "error_feedback")])
def test_a_low_rank_accumulation_the_training_loop_refuses_has_no_estimate(optimizer, key):
    """Layer-wise accumulation into low-rank buffers cannot serve an update form that scales the
    whole gradient, nor error feedback: the model refuses what the loop refuses, with its words."""
    setup = TrainingSetup(optimizer, rank=8, batch_size=2, total_batch_size=4, seq_len=16, layerwise=True)
    with pytest.raises(
        ValueError, match=rf"Invalid accumulation_buffer with {key}.*allowed: accumulation_buffer='full'"
    ):
        estimate_memory(tiny_config(), setup)
    full = estimate_memory(tiny_config(), dataclasses.replace(setup, accumulation_buffer="full")).as_dict()
    assert full["accumulation_buffers_bytes"] == 0 and full["total_bytes"] > 0
