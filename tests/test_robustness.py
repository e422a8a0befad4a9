"""Inputs that break peers: non-finite and degenerate gradients, SVD failures, low precision,
odd layouts and shapes."""

import logging

import pytest
import torch

from lowmem_optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from lowmem_optim.projection import svd as svd_module


def _param(shape, seed=0, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype))


def test_non_finite_gradient_at_a_refresh_raises_a_clear_error():
    p = _param((32, 16))
    opt = GaLoreAdamW([{"params": [p], "rank": 4}])
    p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(FloatingPointError, match="inf/NaN at a subspace refresh"):
        opt.step()


def test_svd_failure_falls_back_and_never_produces_nan(monkeypatch):
    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(svd_module.torch.linalg, "svd", failing_svd)
    p = _param((48, 24))
    g = torch.randn(48, 24, generator=torch.Generator().manual_seed(1))
    opt = GaLoreAdamW([{"params": [p], "rank": 4}])
    p.grad = g.clone()
    opt.step()
    basis = opt.state[p]["proj_right"].double()  # 4 x 24, from the eigh fallback
    monkeypatch.undo()
    _, _, vh = torch.linalg.svd(g.double())
    # same subspace as the exact SVD: projector difference is ~0
    assert torch.dist(basis.T @ basis, vh[:4].T @ vh[:4]) < 1e-4
    assert torch.isfinite(p).all()


def test_ill_conditioned_and_rank_deficient_gradients_stay_finite():
    u = torch.randn(64, 1, generator=torch.Generator().manual_seed(2))
    v = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    grads = [1e18 * u @ v, 1e-30 * u @ v, (u @ v) + 1e-20 * torch.randn(64, 32)]
    for g in grads:
        p = _param((64, 32))
        opt = GaLoreAdamW([{"params": [p], "rank": 8, "update_proj_gap": 1}])
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(t).all() for t in opt.state[p].values() if torch.is_tensor(t))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor, GaLoreAdamW8bit])
def test_half_precision_params_train_and_stay_in_their_dtype(cls, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(dtype)
    groups = [{"params": [model[0].bias, model[2].bias]},
              {"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 5}]
    extra = {} if cls is GaLoreAdafactor else {"lr": 1e-2}
    opt = cls(groups, **extra)
    x, y = torch.randn(32, 16).to(dtype), torch.randn(32, 4).to(dtype)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_non_contiguous_param_gets_the_same_update_as_a_contiguous_one():
    base = torch.randn(24, 40, generator=torch.Generator().manual_seed(4))
    strided = torch.nn.Parameter(base.t().contiguous().t())  # 24 x 40, column-major
    dense = torch.nn.Parameter(base.clone())
    assert not strided.is_contiguous()
    opts = [GaLoreAdamW([{"params": [q], "rank": 4, "update_proj_gap": 2}]) for q in (strided, dense)]
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        g = torch.randn(24, 40, generator=gen)
        strided.grad, dense.grad = g.t().contiguous().t(), g.clone()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(strided, dense, rtol=0, atol=1e-6)


def test_one_dimensional_param_in_a_low_rank_group_is_refused_by_name():
    bias = torch.nn.Parameter(torch.zeros(16))
    with pytest.raises(ValueError, match=r"'fc.bias'.*1-D.*rank=4"):
        GaLoreAdamW([{"params": [bias], "param_names": ["fc.bias"], "rank": 4}])


def test_conv_weight_is_projected_as_out_by_rest():
    conv = torch.nn.Conv2d(8, 32, kernel_size=3)
    opt = GaLoreAdamW([{"params": [conv.weight], "rank": 4}])
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    state = opt.state[conv.weight]
    assert state["proj_left"].shape == (32, 4) and state["exp_avg"].shape == (4, 72)


def test_rank_at_least_the_matrix_size_updates_full_rank_and_says_so(caplog):
    w = torch.randn(12, 8, generator=torch.Generator().manual_seed(6))
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = GaLoreAdamW([{"params": [ours], "rank": 8}])
    torch_opt = torch.optim.AdamW([ref])
    with caplog.at_level(logging.WARNING, logger="lowmem_optim.engine"):
        for _ in range(3):
            g = torch.randn(12, 8)
            ours.grad, ref.grad = g.clone(), g.clone()
            opt.step()
            torch_opt.step()
    assert torch.equal(ours, ref)
    assert sum("updated full-rank" in r.message for r in caplog.records) == 1
    assert opt.layer_stats()[0]["side"] == "full-rank"


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = GaLoreAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor, GaLoreAdamW8bit])
def test_optimizers_step_on_cuda_and_match_cpu(cls):
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(7))
    grads = [torch.randn(256, 128, generator=torch.Generator().manual_seed(8 + i)) for i in range(5)]
    results = []
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(w.clone().to(device))
        opt = cls([{"params": [p], "rank": 16, "update_proj_gap": 2}], **({"min_8bit_size": 0} if cls is GaLoreAdamW8bit else {}))
        for g in grads:
            p.grad = g.to(device)
            opt.step()
        results.append(p.detach().cpu())
    torch.testing.assert_close(results[0], results[1], rtol=1e-3, atol=1e-4)
