"""Low-rank gradient accumulation with layer-wise updates (``accumulation_buffer``): equal to
ordinary accumulation without a refresh, micro-batch 1 chooses a refreshed subspace, bounded
and unbiased low-precision buffers, refusals, buffers allocated once, exact resume."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lowmem_optim import GaLoreAdamW, layerwise, lowrank_param_groups
from lowmem_optim.layerwise import AccumulationBuffer, buffer_bytes
from lowmem_optim.quant.blockwise import dynamic_map
from tests.helpers.gloo import run_rank
from tests.helpers.models import batches, loss_of, tiny_model
from tests.helpers.reference import svd_basis

K = 3  # micro-batches per step


def galore(model: nn.Module, gap: int = 2, **low) -> GaLoreAdamW:
    groups = lowrank_param_groups(model, "all-linear", rank=4, update_proj_gap=gap, **low)
    return GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1)


def projected(model: nn.Module, opt: GaLoreAdamW) -> list[nn.Parameter]:
    return [p for p in model.parameters() if opt.is_projected(p)]


def ordinary_steps(model, opt, data):
    for i in range(0, len(data), K):
        for tokens in data[i : i + K]:
            (loss_of(model, tokens) / K).backward()
        opt.step()
        opt.zero_grad()


def accumulated_steps(model, data):
    for tokens in data:
        (loss_of(model, tokens) / K).backward()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_float32_buffers_equal_ordinary_accumulation_on_steps_without_a_refresh(dtype, tol):
    """After an ordinary step 1 (the refresh), steps 2-4 (gap 100: no refresh) of low-rank
    accumulation equal ordinary accumulation: to 1e-12 in float64; in float32 to 1e-5 (the
    projections' summation order differs, and Adam's normalization carries float32 rounding of
    R, ~1e-7 relative, into the update at up to lr times that)."""
    ref, ours = tiny_model().to(dtype), tiny_model().to(dtype)
    opt_ref, opt = galore(ref, gap=100), galore(ours, gap=100)
    data = batches(4 * K)
    ordinary_steps(ref, opt_ref, data)
    ordinary_steps(ours, opt, data[:K])
    handle = layerwise.attach(opt, accumulation_steps=K, accumulation_buffer="float32")
    accumulated_steps(ours, data[K:])
    assert handle.buffers and all(b.tensors[0].dtype == dtype for b in handle.buffers.values())
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=name)
    # the comparison can fail: a step with one micro-batch left out is far from the reference
    assert max((a - b).abs().max() for a, b in zip(ref.parameters(), galore_steps_dropping_one(dtype, data))) > 1e-3


def galore_steps_dropping_one(dtype, data):
    model = tiny_model().to(dtype)
    opt = galore(model, gap=100)
    ordinary_steps(model, opt, data[:K])
    layerwise.attach(opt, accumulation_steps=K - 1, accumulation_buffer="float32")
    for i in range(K, len(data), K):
        accumulated_steps(model, data[i : i + K - 1])
    return list(model.parameters())


def micro_gradients(model: nn.Module, data: list[torch.Tensor]) -> list[dict[nn.Parameter, torch.Tensor]]:
    grads = []
    for tokens in data:
        model.zero_grad()
        (loss_of(model, tokens) / K).backward()
        grads.append({p: p.grad.clone() for p in model.parameters()})
    model.zero_grad()
    return grads


def reference_step(model: nn.Module, opt: GaLoreAdamW, grads: list[dict[nn.Parameter, torch.Tensor]]) -> None:
    """One step by hand from the micro-batch gradients: the others on their sum; a projected
    parameter begins with micro-batch 1's gradient and finishes from the sum of projections."""
    for p in model.parameters():
        if not opt.is_projected(p):
            opt.step_param(p, sum(g[p] for g in grads))
            continue
        opt.begin_step(p, grads[0][p])
        opt.finish_step(p, sum(opt.project_gradient(p, g[p]) for g in grads))


def test_refresh_step_chooses_the_subspace_from_micro_batch_one_and_projects_every_micro_batch_on_it():
    """Gap 2 over 3 steps (refreshes at steps 1 and 3). Reference, by hand: the basis is the
    SVD of micro-batch 1's gradient (not of the sum), and the step uses the sum of every
    micro-batch's projection on that basis."""
    ref, ours = tiny_model().double(), tiny_model().double()
    opt_ref, opt = galore(ref), galore(ours)
    data = batches(3 * K)
    layerwise.attach(opt, accumulation_steps=K, accumulation_buffer="float32")
    for step in range(3):
        chunk = data[step * K : (step + 1) * K]
        grads = micro_gradients(ref, chunk)
        reference_step(ref, opt_ref, grads)
        accumulated_steps(ours, chunk)
        if step in (0, 2):  # a refresh: the basis is micro-batch 1's
            for p_ref, p in zip(projected(ref, opt_ref), projected(ours, opt)):
                key = "proj_right" if "proj_right" in opt.state[p] else "proj_left"
                side = key.removeprefix("proj_")
                basis = opt.state[p][key]
                basis = basis.T if basis.shape[0] == 4 else basis
                assert torch.equal(opt.state[p][key], opt_ref.state[p_ref][key])
                # the projector's SVD runs in float32: equal to float64's to ~1e-6
                first = svd_basis(grads[0][p_ref], 4, side)
                whole = svd_basis(sum(g[p_ref] for g in grads), 4, side)
                torch.testing.assert_close(basis, first, rtol=0, atol=1e-5)
                assert (basis - whole).abs().max() > 1e-3, "the sum's basis would differ"
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["bfloat16", "8bit"])
def test_low_precision_buffers_are_within_their_rounding_bound_and_unbiased(kind):
    """k additions, each partial sum rounded once: the error per value is at most k - 1 rounding
    steps (bfloat16: 2^-7 of the largest partial sum's magnitude; 8 bits: the dynamic map's
    widest gap times the block's scale, largest partial sum / 0.993), and the mean over 64
    seeds of the rounded sum is 4x closer to the exact sum than one rounded sum (unbiased)."""
    gen = torch.Generator().manual_seed(0)
    lows = [torch.randn(4, 300, generator=gen) for _ in range(6)]
    exact = torch.stack(lows).sum(0)
    partial = torch.stack(lows).cumsum(0).abs().amax(0)  # per value, the largest partial sum
    if kind == "bfloat16":
        bound = (len(lows) - 1) * 2.0**-7 * partial
    else:
        code = dynamic_map(True, "cpu")
        bound = (len(lows) - 1) * (code[1:] - code[:-1]).max() * partial.max() / code[0].abs()
    totals = []
    for seed in range(64):
        buffer = AccumulationBuffer(kind, lows[0])
        for j, low in enumerate(lows[:-1]):
            buffer.write(low, first=j == 0, seed=seed * 100 + j)
        totals.append(buffer.total(lows[-1]).clone())
    errors = torch.stack(totals) - exact
    assert (errors.abs() <= bound).all()
    assert errors.abs().mean() > 0, "the buffer rounds"
    assert errors.mean(0).abs().mean() < errors.abs().mean() / 4


def test_each_rounded_write_draws_from_its_own_seed(monkeypatch):
    """Seeded per parameter, step and micro-batch: no two writes of the buffers share their draws."""
    seeds = []
    write = AccumulationBuffer.write

    def recorded(self, low, first, seed):
        seeds.append(seed)
        write(self, low, first, seed)

    monkeypatch.setattr(AccumulationBuffer, "write", recorded)
    model = tiny_model()
    opt = galore(model)
    layerwise.attach(opt, accumulation_steps=K, accumulation_buffer="bfloat16")
    accumulated_steps(model, batches(2 * K))
    assert len(seeds) == 2 * (K - 1) * len(projected(model, opt)) > 0  # the last micro-batch is not written
    assert len(set(seeds)) == len(seeds)


def test_buffers_are_allocated_once_freed_of_gradients_and_sized_as_the_memory_model_says():
    model = tiny_model()
    opt = galore(model)
    handle = layerwise.attach(opt, accumulation_steps=K, accumulation_buffer="8bit")
    data = batches(3 * K)
    pointers = None
    for i, tokens in enumerate(data):
        (loss_of(model, tokens) / K).backward()
        assert all(p.grad is None for p in projected(model, opt)), "full gradients freed every micro-batch"
        others = [p.grad is not None for p in model.parameters() if not opt.is_projected(p)]
        assert all(others) if i % K < K - 1 else not any(others), "the others accumulate in .grad"
        if i % K == K - 1:
            now = [t.data_ptr() for b in handle.buffers.values() for t in b.tensors]
            assert pointers is None or now == pointers, "reused, not reallocated"
            pointers = now
    expected = sum(buffer_bytes("8bit", 4 * max(p.shape), p.dtype) for p in projected(model, opt))  # R: r x max(m, n)
    assert handle.buffer_bytes() == expected > 0
    handle.remove()
    assert not handle.buffers


def test_error_feedback_non_composed_optimizers_and_bad_values_are_refused_by_name():
    model = tiny_model()
    with pytest.raises(ValueError, match="error_feedback='float32'"):
        layerwise.attach(galore(model, error_feedback="float32"), accumulation_steps=2, accumulation_buffer="float32")
    with pytest.raises(ValueError, match="ComposedOptimizer"):
        layerwise.attach(torch.optim.AdamW(model.parameters()), accumulation_steps=2, accumulation_buffer="bfloat16")
    with pytest.raises(ValueError, match="accumulation_buffer: 'fp8'"):
        layerwise.attach(galore(model), accumulation_steps=2, accumulation_buffer="fp8")
    # one micro-batch per step, or full buffers: error feedback is fine
    layerwise.attach(galore(model, error_feedback="float32"), accumulation_steps=2).remove()


def test_resume_across_a_step_boundary_is_exact_with_8bit_buffers():
    data = batches(4 * K)
    full = tiny_model()
    layerwise.attach(galore(full), accumulation_steps=K, accumulation_buffer="8bit")
    accumulated_steps(full, data)

    part = tiny_model()
    opt = galore(part)
    handle = layerwise.attach(opt, accumulation_steps=K, accumulation_buffer="8bit")
    accumulated_steps(part, data[: 2 * K])
    saved = io.BytesIO()
    torch.save({"model": part.state_dict(), "optim": opt.state_dict()}, saved)
    handle.remove()
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed = tiny_model(seed=7)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = galore(resumed)
    opt2.load_state_dict(checkpoint["optim"])
    layerwise.attach(opt2, accumulation_steps=K, accumulation_buffer="8bit")
    accumulated_steps(resumed, data[2 * K :])
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def _rank_main(rank: int, init_file: str, out: str) -> None:
    def train() -> None:
        model = tiny_model().double()
        handle = layerwise.attach(
            galore(model), accumulation_steps=K, accumulation_buffer="float32", process_group=dist.group.WORLD
        )
        for tokens in batches(3 * K, seed=10 + rank):  # each rank sees different data
            (loss_of(model, tokens) / K).backward()
        if rank == 0:
            torch.save(model.state_dict(), out)
        handle.remove()  # its hooks hold the group, in a cycle through autograd that gc cannot break

    run_rank(rank, 2, init_file, train)


def test_data_parallel_low_rank_accumulation_chooses_one_subspace_from_the_averaged_first_micro_batch(tmp_path):
    """Two gloo ranks, 3 steps of 3 micro-batches, refreshes at steps 1 and 3: every rank's
    step equals one process stepping on the rank-averaged gradients, the subspace chosen from
    micro-batch 1's averaged gradient."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_rank_main, args=(str(tmp_path / "init"), out), nprocs=2, start_method="spawn")
    ref = tiny_model().double()
    opt = galore(ref)
    data = list(zip(batches(3 * K, seed=10), batches(3 * K, seed=11)))
    for step in range(3):
        grads = []
        for a, b in data[step * K : (step + 1) * K]:
            ref.zero_grad()
            ((loss_of(ref, a) + loss_of(ref, b)) / (2 * K)).backward()
            grads.append({p: p.grad.clone() for p in ref.parameters()})
        ref.zero_grad()
        reference_step(ref, opt, grads)
    got = torch.load(out, weights_only=True)
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(got[name], p, rtol=0, atol=1e-10, msg=name)


def test_clipping_scales_a_projected_parameters_summed_projection_by_its_own_norm():
    """max_grad_norm with low-rank accumulation: R = sum of projections is clipped by ||R||
    (the full gradient's norm never exists); the others as clip_grad_norm_ on their sum."""
    clip = 1e-3
    ref, ours = tiny_model().double(), tiny_model().double()
    opt_ref, opt = galore(ref), galore(ours)
    data = batches(2 * K)
    layerwise.attach(opt, accumulation_steps=K, accumulation_buffer="float32", max_grad_norm=clip)
    for step in range(2):
        chunk = data[step * K : (step + 1) * K]
        grads = micro_gradients(ref, chunk)
        for p in ref.parameters():
            if not opt_ref.is_projected(p):
                total = sum(g[p] for g in grads)
                opt_ref.step_param(p, total * (clip / (total.norm() + 1e-6)).clamp(max=1.0))
                continue
            opt_ref.begin_step(p, grads[0][p])
            low = sum(opt_ref.project_gradient(p, g[p]) for g in grads)
            opt_ref.finish_step(p, low * (clip / (low.norm() + 1e-6)).clamp(max=1.0))
        accumulated_steps(ours, chunk)
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)


def test_micro_batches_find_their_parameters_without_rebuilding_the_index(monkeypatch):
    """The hot path is O(1) per parameter: once attached, micro-batches and updates (refresh
    steps included) look parameters up in the index built with the groups, which also holds
    each group's parts; neither is rebuilt per call."""
    from lowmem_optim.engine import optimizer as optimizer_module

    model = tiny_model()
    opt = galore(model, gap=2)
    layerwise.attach(opt, accumulation_steps=K, accumulation_buffer="float32")
    builds = []

    class CountedIndex(optimizer_module.ParamIndex):
        def __init__(self, param_groups):
            builds.append(len(param_groups))
            super().__init__(param_groups)

    monkeypatch.setattr(optimizer_module, "ParamIndex", CountedIndex)
    before = [p.detach().clone() for p in model.parameters()]
    accumulated_steps(model, batches(3 * K))  # steps 1-3: two of them refresh
    assert all(int(opt.state[p]["step"]) == 3 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert builds == []
