import itertools

import pytest
import scipy.fft
import torch

import lowmem_optim
from lowmem_optim import DCTAdamW
from lowmem_optim.parts import defaults
from lowmem_optim.projection.dct import DCTProjector, dct_basis, dct_fft, dct_spectrum, select_indices
from lowmem_optim.rules import momentum_storage

CPU = torch.device("cpu")


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("d", [1, 7, 16, 33])
def test_dct_basis_is_orthonormal_and_is_the_dct_ii(d):
    q = dct_basis(d, torch.float64, CPU)
    assert torch.allclose(q.T @ q, torch.eye(d, dtype=torch.float64), atol=1e-12)
    a = _randn(5, d).double()
    assert torch.allclose(a @ q, torch.from_numpy(scipy.fft.dct(a.numpy(), type=2, norm="ortho", axis=1)), atol=1e-12)


def test_dct_basis_is_cached_per_size_dtype_and_device():
    assert dct_basis(12, torch.float32, CPU) is dct_basis(12, torch.float32, CPU)
    assert dct_basis(12, torch.float64, CPU).dtype == torch.float64


@pytest.mark.parametrize("shape, dim", [((40, 24), 1), ((40, 25), 1), ((31, 50), 0), ((32, 50), 0)])
@pytest.mark.parametrize("score", ["l1", "l2"])
def test_fft_and_matmul_paths_give_the_same_spectrum_and_the_same_indices(shape, dim, score):
    a = _randn(*shape, seed=shape[0])
    by_matmul = dct_spectrum(a, dim, fft_threshold=10**9)
    by_fft = dct_spectrum(a, dim, fft_threshold=1)
    assert torch.allclose(by_fft, by_matmul, atol=1e-5)
    assert torch.allclose(dct_fft(a.double(), dim).double(), by_matmul.double(), atol=1e-5)
    assert torch.equal(select_indices(by_fft, dim, 6, score), select_indices(by_matmul, dim, 6, score))


def test_l2_selection_minimizes_the_projection_error_over_all_subsets_of_the_basis():
    a = _randn(12, 8, seed=3).double() * torch.linspace(0.2, 2.0, 8, dtype=torch.float64)
    q = dct_basis(8, torch.float64, CPU)

    def error(index):
        qi = q[:, list(index)]
        return float((a - a @ qi @ qi.T).norm())

    chosen = select_indices(dct_spectrum(a, 1, 10**9), 1, 3, "l2").tolist()
    best = min(itertools.combinations(range(8), 3), key=error)
    assert chosen == list(best)
    assert error(chosen) <= min(error(c) for c in itertools.combinations(range(8), 3)) + 1e-12


@pytest.mark.parametrize(
    "proj_type, shape, dim", [("std", (24, 16), 1), ("std", (16, 24), 0), ("reverse_std", (24, 16), 0)]
)
def test_projection_reads_the_selected_spectrum_and_back_projection_uses_the_same_vectors(proj_type, shape, dim):
    g = _randn(*shape, seed=1)
    state = {}
    projector = DCTProjector()
    projector.refresh(g, state, {**defaults(projector), "rank": 5, "proj_type": proj_type}, seed=0)
    assert state["proj_index"].dtype == torch.int64 and state["proj_dim"] == dim
    low = projector.project(g, state)  # from the refresh's spectrum
    again = DCTProjector().project(g, state)  # by a product with the cached basis
    assert torch.allclose(low, again, atol=1e-5)
    q = dct_basis(shape[dim], torch.float32, CPU)[:, state["proj_index"]]
    expected = q @ q.T @ g if dim == 0 else g @ q @ q.T
    assert torch.allclose(projector.back_project(low, state), expected, atol=1e-5)


@pytest.mark.parametrize("shape, dim", [((24, 16), 1), ((16, 24), 0)])
def test_type_3_selects_columns_of_the_dct_ii_matrix_itself_the_authors_matmul_orientation(shape, dim):
    """Type 3 projects onto the columns of C (the DCT-III vectors), whatever the FFT threshold."""
    g = _randn(*shape, seed=2).double()
    c = dct_basis(shape[dim], torch.float64, CPU).T  # C: row k is the k-th DCT-II vector
    expected = c.T @ g if dim == 0 else g @ c
    for threshold in (1, 10**9):
        assert torch.allclose(dct_spectrum(g, dim, threshold, dct_type=3), expected, atol=1e-12)
    state, projector = {}, DCTProjector()
    projector.refresh(g, state, {**defaults(projector), "rank": 4, "dct_type": 3}, seed=0)
    assert torch.equal(state["proj_index"], select_indices(expected, dim, 4, "l1"))
    q = c[:, state["proj_index"]]
    low = projector.project(g, state)
    assert torch.allclose(DCTProjector().project(g, state), low, atol=1e-12)
    assert torch.allclose(projector.back_project(low, state), q @ q.T @ g if dim == 0 else g @ q @ q.T, atol=1e-12)


def _spectrum_gradient(columns: dict[int, float], m: int = 10, n: int = 8) -> torch.Tensor:
    """G = S Q^T: a gradient whose DCT spectrum (right side) is nonzero on the given columns."""
    s = torch.zeros(m, n, dtype=torch.float64)
    for column, size in columns.items():
        s[:, column] = size * torch.linspace(1.0, 2.0, m, dtype=torch.float64)
    return s @ dct_basis(n, torch.float64, CPU).T


@pytest.mark.parametrize("keep", [True, False])
def test_moments_follow_kept_indices_and_new_indices_start_at_zero_against_a_float64_reference(keep):
    w = torch.nn.Parameter(torch.zeros(10, 8, dtype=torch.float64))
    opt = DCTAdamW([{"params": [w], "rank": 3}], lr=0.1, weight_decay=0.0, dct_keep_moments=keep, error_feedback=None)
    g1, g2 = _spectrum_gradient({0: 3.0, 2: 2.0, 5: 1.0}), _spectrum_gradient({2: 3.0, 5: 2.0, 7: 1.5, 0: 0.5})
    w.grad = g1
    opt.step()
    assert opt.state[w]["proj_index"].tolist() == [0, 2, 5]
    w.grad = g2
    opt.step()
    assert opt.state[w]["proj_index"].tolist() == [2, 5, 7]
    assert opt.layer_stats()[0]["last_similarity"] == pytest.approx(2 / 3)
    q = dct_basis(8, torch.float64, CPU)
    r1, r2 = g1 @ q[:, [0, 2, 5]], g2 @ q[:, [2, 5, 7]]
    m1, v1 = 0.1 * r1, 0.001 * r1**2
    if keep:  # old positions 1, 2 (indices 2, 5) move to 0, 1; index 7 starts at zero
        carry = torch.zeros_like(m1)
        carry[:, :2] = m1[:, 1:]
        m1, v1 = carry, torch.cat([v1[:, 1:], torch.zeros_like(v1[:, :1])], dim=1)
    m2, v2 = 0.9 * m1 + 0.1 * r2, 0.999 * v1 + 0.001 * r2**2
    assert torch.allclose(opt.state[w]["exp_avg"], m2, atol=1e-12)
    assert torch.allclose(opt.state[w]["exp_avg_sq"], v2, atol=1e-12)


def _two_dct_steps(cls: type, **hparams) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(state, R_1, R_2) of two steps of ``cls`` in a rank-3 DCT subspace: indices 0, 2, 5, then 2, 5, 7."""
    w = torch.nn.Parameter(torch.zeros(10, 8, dtype=torch.float64))
    opt = cls([{"params": [w], "rank": 3, "proj_method": "dct", "update_proj_gap": 1}], **hparams)
    g1, g2 = _spectrum_gradient({0: 3.0, 2: 2.0, 5: 1.0}), _spectrum_gradient({2: 3.0, 5: 2.0, 7: 1.5, 0: 0.5})
    for g in (g1, g2):
        w.grad = g
        opt.step()
    q = dct_basis(8, torch.float64, CPU)
    return opt.state[w], g1 @ q[:, [0, 2, 5]], g2 @ q[:, [2, 5, 7]]


def _carried(m: torch.Tensor) -> torch.Tensor:
    """Indices 0, 2, 5 -> 2, 5, 7: the values of 2 and 5 move to positions 0 and 1, 7's start at zero."""
    return torch.cat([m[..., 1:], torch.zeros_like(m[..., :1])], dim=-1)


@pytest.mark.parametrize("kind, tolerance", [("auto", 1e-12), ("bfloat16", 2**-6), ("8bit", 0.03)])
def test_a_normalized_rules_momentum_follows_kept_indices_too(kind, tolerance):
    """AuON in a DCT subspace: M = beta M + (1 - beta) R, M's columns moved with their indices, in
    each stored form (within two roundings of it, relative to the largest value)."""
    state, r1, r2 = _two_dct_steps(lowmem_optim.AuON, lr=0.1, momentum_dtype=kind)
    want = 0.95 * _carried(0.05 * r1) + 0.05 * r2
    stored = momentum_storage._value(state, momentum_storage.stored_kind(state), torch.float64)
    assert momentum_storage.stored_kind(state) == kind
    assert float((stored - want).abs().max()) <= tolerance * float(want.abs().max())


def test_8bit_adams_float_moments_follow_kept_indices_too():
    """Below min_8bit_size the 8-bit rule keeps float32 moments: moved as Adam's are."""
    state, r1, r2 = _two_dct_steps(lowmem_optim.GaLoreAdamW8bit, lr=0.1, min_8bit_size=10**9)
    want = 0.9 * _carried(0.1 * r1) + 0.1 * r2
    torch.testing.assert_close(state["exp_avg"].double(), want, rtol=1e-6, atol=1e-6)


def test_adafactors_factored_statistic_of_the_projected_dimension_follows_kept_indices_too():
    """The column statistic of R (R = G Q_I: its columns are the indices) moves with the indices,
    V_c = beta2_t V_c + (1 - beta2_t) mean over rows of R^2 (+ eps1), beta2_1 = 0, beta2_2 = 1 - 2^-0.8."""
    state, r1, r2 = _two_dct_steps(lowmem_optim.GaLoreAdafactor, beta1=0.9)
    beta2 = 1 - 2**-0.8
    want = beta2 * _carried((r1**2 + 1e-30).mean(0)) + (1 - beta2) * (r2**2 + 1e-30).mean(0)
    torch.testing.assert_close(state["exp_avg_sq_col"].double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("score", ["l1", "l2"])
def test_dct_adamw_matches_a_float64_reference_of_its_equations(score):
    lr, wd, eps, (b1, b2), rank = 0.05, 0.1, 1e-6, (0.8, 0.95), 3
    w0 = _randn(12, 9, seed=5).double()
    w = torch.nn.Parameter(w0.clone())
    opt = DCTAdamW(
        [{"params": [w], "rank": rank}],
        lr=lr,
        weight_decay=wd,
        eps=eps,
        betas=(b1, b2),
        error_feedback=None,
        dct_score=score,
    )
    q = dct_basis(9, torch.float64, CPU)
    ref, m, v, index = w0.clone(), None, None, None
    for t in range(1, 6):
        g = _randn(12, 9, seed=10 + t).double()
        w.grad = g.clone()
        opt.step()
        s = g @ q
        new = torch.topk(s.abs().sum(0) if score == "l1" else s.norm(dim=0), rank).indices.sort().values
        if m is None:
            m, v = torch.zeros(12, rank, dtype=torch.float64), torch.zeros(12, rank, dtype=torch.float64)
        else:
            kept = [index.tolist().index(i) if i in index.tolist() else -1 for i in new.tolist()]
            m = torch.stack([m[:, k] if k >= 0 else torch.zeros(12, dtype=torch.float64) for k in kept], dim=1)
            v = torch.stack([v[:, k] if k >= 0 else torch.zeros(12, dtype=torch.float64) for k in kept], dim=1)
        index = new
        r = s[:, index]
        m = b1 * m + (1 - b1) * r
        v = b2 * v + (1 - b2) * r**2
        n = lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps)
        ref = ref * (1 - lr * wd) - n @ q[:, index].T
        assert torch.allclose(w.detach(), ref, rtol=0, atol=1e-12)


def test_adaptive_schedule_on_dct_grows_the_gap_while_the_index_set_stays():
    w = torch.nn.Parameter(torch.zeros(10, 8, dtype=torch.float64))
    opt = DCTAdamW([{"params": [w], "rank": 3, "queue_size": 2}], lr=1e-3, refresh="adaptive")
    for _ in range(12):
        w.grad = _spectrum_gradient({1: 3.0, 4: 2.0, 6: 1.0})
        opt.step()
    stats = opt.layer_stats()[0]
    assert stats["last_similarity"] == 1.0 and stats["gap"] == 4 and stats["refreshes"] == 6  # 1, 2, 3, 5, 7, 11


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("proj_type", "full", "proj_type"),
        ("dct_score", "l3", "dct_score"),
        ("dct_fft_threshold", 0, "dct_fft_threshold"),
        ("dct_keep_moments", "yes", "dct_keep_moments"),
        ("proj_bits", 4, "proj_bits"),
        ("dct_type", 1, "dct_type"),
        ("dct_type", True, "dct_type"),
    ],
)
def test_dct_rejects_bad_settings_by_name(key, value, match):
    w = torch.nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(ValueError, match=match):
        DCTAdamW([{"params": [w], "rank": 2, key: value}])


def test_non_finite_gradient_at_a_refresh_is_an_error():
    with pytest.raises(FloatingPointError, match="inf/NaN"):
        DCTProjector().refresh(torch.full((4, 3), float("nan")), {}, {**defaults(DCTProjector()), "rank": 2}, seed=0)


def test_dct_adamw_is_built_by_registry_name_with_its_paper_defaults():
    from lowmem_optim import build_optimizer
    from lowmem_optim.registry import LOWRANK_OPTIMIZERS

    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    opt = build_optimizer("dct_adamw", model, target_modules=["0"], rank=3, lr=1e-3)
    assert "dct_adamw" in LOWRANK_OPTIMIZERS and isinstance(opt, DCTAdamW)
    (low,) = [g for g in opt.param_groups if g.get("rank") is not None]
    assert (low["proj_method"], low["update_proj_gap"], low["scale"], low["dct_score"]) == ("dct", 1, 1.0, "l1")
    model(torch.randn(5, 16)).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["proj_index"].numel() == 3
