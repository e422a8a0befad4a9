"""torch.distributed.checkpoint (DCP) with every optimizer of the registry.

The recipe torchtitan uses: ``get_optimizer_state_dict`` + ``dcp.save``; to resume, build a
fresh model and optimizer, take their state dicts as the template (DCP fills a template: only
its keys, with its shapes, are read), ``dcp.load`` into it, then ``set_optimizer_state_dict``.
On a fresh optimizer ``get_optimizer_state_dict`` first initializes the state by one step with
zero gradients and every group's lr set to 0: that step must not move the weights, write NaN,
or choose a subspace from the zero gradient.
"""

from __future__ import annotations

import json
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lowmem_optim.registry import LOWRANK_OPTIMIZERS
from tests.helpers.gloo import end_group
from tests.helpers.tiny import (
    OPTIMIZERS,
    assert_same_state,
    make_optimizer,
    non_finite_state,
    snapshot,
    tiny_llama,
    token_batches,
    train,
)


def dcp_round_trip(name: str, checkpoint_id: str, rank: int = 0, wrap=lambda m: m, **overrides) -> None:
    """Train, save with DCP, resume into a fresh model/optimizer, and check the resume is exact."""
    model = tiny_llama(seed=0)
    optimizer = make_optimizer(name, model, **overrides)  # groups from the bare model (head detection)
    net = wrap(model)
    train(net, optimizer, token_batches(3, seed=1 + rank))  # crosses the refreshes at steps 1 and 3
    dcp.save(
        {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, optimizer)},
        checkpoint_id=checkpoint_id,
    )

    fresh_model = tiny_llama(seed=1)  # other weights: the load must overwrite them
    fresh = make_optimizer(name, fresh_model, **overrides)
    fresh_net = wrap(fresh_model)
    before = snapshot(fresh_model)
    template = {"model": get_model_state_dict(fresh_net), "optim": get_optimizer_state_dict(fresh_net, fresh)}
    moved = [k for k, v in snapshot(fresh_model).items() if not torch.equal(v, before[k])]
    assert not moved, f"DCP's state initialization moved {moved}"
    assert fresh.state, "DCP's state initialization created no state"
    assert not non_finite_state(fresh), f"DCP's state initialization wrote inf/NaN: {non_finite_state(fresh)}"

    dcp.load(template, checkpoint_id=checkpoint_id)
    set_model_state_dict(fresh_net, template["model"])
    set_optimizer_state_dict(fresh_net, fresh, template["optim"])
    assert_same_state(fresh.state_dict(), optimizer.state_dict())

    more = token_batches(2, seed=10 + rank)
    assert train(fresh_net, fresh, more) == train(net, optimizer, more)
    for key, value in snapshot(model).items():
        assert torch.equal(snapshot(fresh_model)[key], value), key


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_dcp_round_trip_in_one_process_resumes_exactly(name, tmp_path):
    dcp_round_trip(name, str(tmp_path / "ckpt"))


def test_dcp_round_trip_keeps_the_adaptive_schedules_queue(tmp_path):
    # regression: the queue of similarities grew from length 0, so DCP's template (one refresh,
    # empty queue) could not take the saved one ("Size mismatch ... sim_queue")
    dcp_round_trip("galore_adamw", str(tmp_path / "ckpt"), refresh="adaptive", update_proj_gap=1)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_dcp_state_initialization_moves_no_weight_with_weight_decay_on(name):
    # regression: Adafactor's relative step size ignored the zeroed lr, so its decay moved weights
    model = tiny_llama()
    optimizer = make_optimizer(name, model, weight_decay=0.1)
    before = snapshot(model)
    get_optimizer_state_dict(model, optimizer)
    assert optimizer.state
    for key, value in snapshot(model).items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", sorted(LOWRANK_OPTIMIZERS))
def test_dcp_state_initialization_leaves_the_subspace_to_the_first_real_gradient(name):
    model = tiny_llama()
    initialized = make_optimizer(name, model)
    get_optimizer_state_dict(model, initialized)  # the zero-gradient step
    plain_model = tiny_llama()
    plain = make_optimizer(name, plain_model)
    tokens = token_batches(1)[0]
    for net, optimizer in ((model, initialized), (plain_model, plain)):
        net(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
    # a random projection's seed names the step of its draw (2 here: the initialization was step 1),
    # not the gradient: every other key of a subspace comes from the first real gradient alike
    subspace = lambda state: {k: v for k, v in state.items() if k.startswith("proj") and k != "proj_seed"}  # noqa: E731
    for p, q in zip(model.parameters(), plain_model.parameters()):
        assert_same_state(subspace(initialized.state[p]), subspace(plain.state[q]))


def _two_process_worker(rank: int, world_size: int, workdir: str) -> None:
    """One of 2 gloo ranks: DDP training and a DCP round trip for every optimizer."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world_size)
    results = {}
    try:
        for name in OPTIMIZERS:
            try:
                dcp_round_trip(name, f"{workdir}/{name}", rank=rank, wrap=DistributedDataParallel)
                results[name] = "ok"
            except Exception:  # reported by the test, per optimizer
                results[name] = traceback.format_exc(limit=-3)
            dist.barrier()
    finally:
        end_group(barrier=False)
        with open(f"{workdir}/rank{rank}.json", "w") as f:
            json.dump(results, f)


def test_dcp_round_trip_on_two_gloo_processes_resumes_exactly(tmp_path, monkeypatch):
    """Every optimizer in one pair of processes (starting processes is the expensive part)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the two ranks share the cores
    mp.spawn(_two_process_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results.keys() == set(OPTIMIZERS)
        failed = {name: err for name, err in results.items() if err != "ok"}
        assert not failed, f"rank {rank}: " + "\n".join(f"{n}: {e}" for n, e in failed.items())
