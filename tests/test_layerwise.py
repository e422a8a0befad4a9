"""Layer-wise updates: same parameters as ordinary stepping, real state_dict, accumulation,
per-parameter clipping, schedulers, data parallel, Q-GaLore on INT8 weights."""

from __future__ import annotations

import gc
import io
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowmem_optim import Fira, GaLoreAdamW, GaLoreAdamW8bit, build_optimizer, layerwise, lowrank_param_groups
from lowmem_optim.quant.int8_linear import quantize_linear_layers
from tests.helpers.gloo import run_rank
from tests.helpers.models import batches, loss_of, tiny_model


def galore(model: nn.Module, cls=GaLoreAdamW) -> torch.optim.Optimizer:
    # gap 2 over 4+ steps: refreshes at steps 1 and 3 happen inside the hooks too
    return cls(lowrank_param_groups(model, "all-linear", rank=4, update_proj_gap=2), lr=1e-2, weight_decay=0.1)


def train_ordinary(model, opt, data, accumulation_steps=1, clip=None):
    for i in range(0, len(data), accumulation_steps):
        for tokens in data[i : i + accumulation_steps]:
            loss_of(model, tokens).backward()
        if clip is not None:
            for p in model.parameters():
                torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()
        opt.zero_grad()


def train_layerwise(model, data):
    for tokens in data:
        loss_of(model, tokens).backward()


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, Fira])
def test_layerwise_equals_ordinary_stepping_after_n_steps(cls):
    ref, lw = tiny_model(), tiny_model()
    data = batches(5)
    train_ordinary(ref, galore(ref, cls), data)
    layerwise.attach(galore(lw, cls))
    train_layerwise(lw, data)
    assert_same_params(ref, lw)
    assert all(p.grad is None for p in lw.parameters()), "every gradient is freed inside backward"


def test_layerwise_with_gradient_accumulation_equals_ordinary_accumulation():
    ref, lw = tiny_model(), tiny_model()
    data = batches(6)
    train_ordinary(ref, galore(ref), data, accumulation_steps=3)
    layerwise.attach(galore(lw), accumulation_steps=3)
    for k, tokens in enumerate(data):
        loss_of(lw, tokens).backward()
        accumulated = [p.grad is not None for p in lw.parameters()]
        assert all(accumulated) if k % 3 < 2 else not any(accumulated)
    assert_same_params(ref, lw)


def test_layerwise_steps_torch_adamw_baseline_like_ordinary():
    ref, lw = tiny_model(), tiny_model()
    data = batches(3)
    train_ordinary(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2), data)
    opt = torch.optim.AdamW(lw.parameters(), lr=1e-2)
    layerwise.attach(opt)
    train_layerwise(lw, data)
    assert_same_params(ref, lw)
    assert all(len(g["params"]) == len(list(lw.parameters())) for g in opt.param_groups), "groups restored"


def test_layerwise_clipping_is_per_parameter_clip_grad_norm():
    ref, lw = tiny_model(), tiny_model()
    data = batches(3)
    train_ordinary(ref, galore(ref), data, clip=0.05)
    layerwise.attach(galore(lw), max_grad_norm=0.05)
    train_layerwise(lw, data)
    assert_same_params(ref, lw)


def test_layerwise_state_dict_round_trips_weights_only_and_resumes_exactly():
    full, part = tiny_model(), tiny_model()
    data = batches(6)
    layerwise.attach(galore(full))
    train_layerwise(full, data)

    opt = galore(part)
    handle = layerwise.attach(opt)
    train_layerwise(part, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": part.state_dict(), "optim": opt.state_dict()}, buffer)
    handle.remove()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    state = saved["optim"]["state"]
    assert len(state) == len(list(part.parameters())), "real per-parameter state, not a dummy"
    assert any("proj_right" in s or "proj_left" in s for s in state.values())

    resumed = tiny_model(seed=7)
    resumed.load_state_dict(saved["model"])
    opt2 = galore(resumed)
    opt2.load_state_dict(saved["optim"])
    layerwise.attach(opt2)
    train_layerwise(resumed, data[3:])
    assert_same_params(full, resumed)


def test_layerwise_lr_scheduler_steps_once_per_training_step_without_warning():
    model = tiny_model()
    opt = galore(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    layerwise.attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for tokens in batches(3):
            loss_of(model, tokens).backward()
            sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2 / 4] * 2)
    assert int(opt.state[model[1].weight]["step"]) == 3


def test_attach_rejects_bad_arguments():
    opt = galore(tiny_model())
    with pytest.raises(ValueError, match="accumulation_steps"):
        layerwise.attach(opt, accumulation_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        layerwise.attach(opt, max_grad_norm=-1.0)


def test_attach_refuses_several_ranks_without_process_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="process_group.*DDP"):
        layerwise.attach(galore(tiny_model()))


def _rank_main(rank: int, init_file: str, out: str) -> None:
    def train() -> None:
        model = tiny_model()
        handle = layerwise.attach(galore(model), process_group=dist.group.WORLD)
        for tokens in batches(3, seed=10 + rank):  # each rank sees different data
            loss_of(model, tokens).backward()
        if rank == 0:
            torch.save(model.state_dict(), out)
        handle.remove()  # its hooks hold the group, in a cycle through autograd that gc cannot break

    run_rank(rank, 2, init_file, train)


def test_layerwise_data_parallel_averages_gradients_over_ranks(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_rank_main, args=(str(tmp_path / "init"), out), nprocs=2, start_method="spawn")
    # single-process reference: the mean of the two ranks' losses has the averaged gradient
    ref = tiny_model()
    opt = galore(ref)
    for a, b in zip(batches(3, seed=10), batches(3, seed=11)):
        ((loss_of(ref, a) + loss_of(ref, b)) / 2).backward()
        opt.step()
        opt.zero_grad()
    got = torch.load(out, weights_only=True)
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_remove_lets_the_parameters_and_optimizer_be_freed_and_only_remove_does():
    """PyTorch holds post-accumulate-grad hooks out of the garbage collector's sight, so attached
    hooks keep the optimizer and the parameters alive (as the module docstring says); remove()
    releases them, which in-process trials and a clean destroy_process_group rely on."""

    def train(remove: bool) -> tuple[weakref.ref, weakref.ref]:  # locals gone on return
        model = tiny_model()
        opt = galore(model)
        handle = layerwise.attach(opt)
        train_layerwise(model, batches(2))
        if remove:
            handle.remove()
        return weakref.ref(model[1].weight), weakref.ref(opt)

    for remove in (False, True):
        weight, opt = train(remove)
        gc.collect()
        assert (weight() is None, opt() is None) == (remove, remove), f"remove={remove}"


@pytest.mark.parametrize("make", [galore, lambda model: torch.optim.AdamW(model.parameters())])
def test_optimizer_step_while_attached_is_refused_and_allowed_again_after_remove(make):
    model = tiny_model()
    opt = make(model)
    handle = layerwise.attach(opt)
    train_layerwise(model, batches(1))  # the hooks step (torch AdamW through its own step())
    with pytest.raises(RuntimeError, match="layer-wise updates are attached.*clip nothing"):
        opt.step()
    handle.remove()
    loss_of(model, batches(1)[0]).backward()
    opt.step()


def test_hf_trainer_with_a_layerwise_optimizer_is_refused_with_the_reason(tmp_path):
    """The Trainer clips and accumulates around optimizer.step(): with the updates already done
    inside backward that would silently do nothing, so its first step raises."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=16,
        )
    )
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=4), lr=1e-3)
    layerwise.attach(opt)
    rows = [{"input_ids": torch.arange(16) % 64, "labels": torch.arange(16) % 64}] * 8
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
    )
    with pytest.raises(RuntimeError, match="layer-wise updates are attached.*HF Trainer"):
        trainer.train()


class Int8Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 80), nn.ReLU(), nn.Linear(80, 32))
        self.lm_head = nn.Linear(32, 64, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.lm_head(h + self.mlp(h))


def train_q_galore_int8(use_layerwise: bool, steps: int = 6) -> tuple[nn.Module, float, float]:
    model = quantize_linear_layers(Int8Tiny())
    opt = build_optimizer("q_galore_adamw8bit", model, rank=4, update_proj_gap=2, lr=2e-2, min_8bit_size=0)
    if use_layerwise:
        layerwise.attach(opt)
    tokens = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 64), tokens[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss.item())
        if not use_layerwise:
            opt.step()
            opt.zero_grad()
    return model, losses[0], losses[-1]


def test_int8_weights_with_layerwise_updates_train_and_equal_ordinary_stepping():
    lw, first, last = train_q_galore_int8(use_layerwise=True)
    ordinary, _, _ = train_q_galore_int8(use_layerwise=False)
    assert last < first - 0.1
    for a, b in zip(lw.modules(), ordinary.modules()):
        for (name, x), y in zip(a.named_buffers(recurse=False), b.buffers(recurse=False)):
            assert torch.equal(x, y), name
    for (name, x), y in zip(lw.named_parameters(), ordinary.parameters()):
        assert torch.equal(x, y), name
    assert len(lowrank_param_groups(lw, rank=4)[1]["params"]) == 2


@pytest.mark.parametrize("make", [galore, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)])
def test_attaching_an_attached_optimizer_is_refused_until_removed(make):
    model = tiny_model()
    opt = make(model)
    handle = layerwise.attach(opt)
    with pytest.raises(ValueError, match=r"^Invalid optimizer: this \w+ is already attached"):
        layerwise.attach(opt)
    train_layerwise(model, batches(1))  # the first handle alone steps: no double update, no error
    handle.remove()
    layerwise.attach(opt).remove()


@pytest.mark.parametrize("make", [galore, lambda m: torch.optim.AdamW(m[:-1].parameters(), lr=1e-2)])
def test_a_param_group_added_while_attached_is_stepped_layerwise(make):
    ref, lw = tiny_model(), tiny_model()
    data = batches(3)
    for model in (ref, lw):
        model[-1].weight.requires_grad_(True)
    ref_opt, lw_opt = make(ref), make(lw)
    if isinstance(ref_opt, torch.optim.AdamW):  # the head joins later, as its own group
        handle = layerwise.attach(lw_opt)
        lw_opt.add_param_group({"params": [lw[-1].weight]})
        ref_opt.add_param_group({"params": [ref[-1].weight]})
        train_ordinary(ref, ref_opt, data)
        train_layerwise(lw, data)
        assert_same_params(ref, lw)
        assert lw[-1].weight.grad is None
        handle.remove()
        assert "add_param_group" not in vars(lw_opt)
    else:  # a new parameter joining a low-rank optimizer's groups is hooked and stepped too
        extra = nn.Parameter(torch.zeros(3))
        handle = layerwise.attach(lw_opt)
        lw_opt.add_param_group({"params": [extra], "param_names": ["extra"]})
        ((lw(data[0][:, :-1]).sum() + extra.sum()) * 0).backward()
        assert extra.grad is None and lw_opt.state[extra]
        handle.remove()
