import pytest
import torch

from lowmem_optim import GaLoreAdamW
from lowmem_optim.parts import defaults
from lowmem_optim.projection.randomized_svd import RandomizedSVDProjector, randomized_singular_vectors
from lowmem_optim.projection.svd import singular_vectors


def _decaying(m: int, n: int, spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, spectrum.numel(), generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, spectrum.numel(), generator=gen))[0]
    return u @ torch.diag(spectrum) @ v.T


def _error(a: torch.Tensor, u: torch.Tensor, rank: int) -> float:
    p = u[:, :rank]
    return float((a - p @ (p.T @ a)).norm())


@pytest.mark.parametrize("decay", ["geometric", "power"])
@pytest.mark.parametrize("shape", [(160, 96), (96, 160)])
def test_subspace_error_is_within_one_percent_of_the_exact_svd_on_decaying_spectra(decay, shape):
    k = torch.arange(1, 97, dtype=torch.float32)
    spectrum = 0.9**k if decay == "geometric" else k**-1.0
    a = _decaying(*shape, spectrum, seed=1)
    rank = 12
    exact = _error(a, singular_vectors(a)[0], rank)
    u, vh = randomized_singular_vectors(
        a, rank, oversample=10, power_iters=2, generator=torch.Generator().manual_seed(0)
    )
    assert _error(a, u, rank) <= 1.01 * exact
    assert float((a - (a @ vh[:rank].T) @ vh[:rank]).norm()) <= 1.01 * exact


def test_power_iterations_reduce_the_error_on_a_slowly_decaying_spectrum():
    a = _decaying(200, 120, torch.arange(1, 121, dtype=torch.float32) ** -0.5, seed=2)
    errors = [
        _error(a, randomized_singular_vectors(a, 10, 5, q, torch.Generator().manual_seed(0))[0], 10) for q in (0, 2)
    ]
    assert errors[1] < errors[0]


def test_draws_come_from_the_seed_not_the_global_rng():
    g = torch.randn(48, 20, generator=torch.Generator().manual_seed(3))
    projector = RandomizedSVDProjector()
    group = {**defaults(projector, projector.storage), "rank": 4}
    before = torch.random.get_rng_state()
    first, second, other = {}, {}, {}
    RandomizedSVDProjector().refresh(g, first, group, seed=11)
    torch.manual_seed(123)  # a different global state must not matter
    RandomizedSVDProjector().refresh(g, second, group, seed=11)
    RandomizedSVDProjector().refresh(g, other, group, seed=12)
    assert torch.equal(first["proj_right"], second["proj_right"])
    assert not torch.equal(first["proj_right"], other["proj_right"])
    torch.random.set_rng_state(before)
    RandomizedSVDProjector().refresh(g, {}, group, seed=11)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("key, value", [("oversample", 0), ("power_iters", 0)])
def test_the_groups_oversample_and_power_iters_shape_the_sketch(key, value):
    """The projector's basis is the sketch of :func:`randomized_singular_vectors` at the group's
    settings: at another value of either, another basis from the same seed."""
    g = _decaying(48, 20, torch.arange(1, 21, dtype=torch.float32) ** -0.5, seed=4)
    projector = RandomizedSVDProjector()
    group = {**defaults(projector, projector.storage), "rank": 4}
    default, changed = {}, {}
    projector.refresh(g, default, group, seed=11)
    projector.refresh(g, changed, {**group, key: value}, seed=11)
    assert not torch.allclose(changed["proj_right"], default["proj_right"], atol=1e-4)


@pytest.mark.parametrize("key, value", [("oversample", -1), ("power_iters", 1.5)])
def test_bad_randomized_svd_hyperparameters_are_rejected_by_name(key, value):
    w = torch.nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(ValueError, match=key):
        GaLoreAdamW([{"params": [w], "rank": 2, "proj_method": "randomized_svd", key: value}])
