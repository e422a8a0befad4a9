import copy
import io

import pytest
import torch

from lowmem_optim import GaLoreAdamW
from lowmem_optim.engine.param_step import refresh_seed
from lowmem_optim.parts import SubspaceChange, defaults
from lowmem_optim.projection.random import RandomProjector
from lowmem_optim.tools.memory_optimizer import optimizer_memory


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _refreshed(shape: tuple[int, int], seed: int, rank: int = 4, proj_type: str = "std") -> dict:
    state: dict = {}
    group = {**defaults(RandomProjector()), "rank": rank, "proj_type": proj_type}
    change = RandomProjector().refresh(torch.zeros(shape), state, group, seed)
    assert change == SubspaceChange()  # moments kept as they are, no similarity to report
    return state


def test_the_same_seed_regenerates_the_same_matrix_without_touching_the_global_rng():
    like = torch.zeros(())
    before = torch.random.get_rng_state()
    first, _ = RandomProjector().matrices(_refreshed((24, 40), seed=11), like)
    torch.manual_seed(123)  # the global state must not matter
    again, _ = RandomProjector().matrices(_refreshed((24, 40), seed=11), like)
    other, _ = RandomProjector().matrices(_refreshed((24, 40), seed=12), like)
    assert first.shape == (24, 4) and torch.equal(first, again)
    assert not torch.allclose(first, other, atol=0.1)
    torch.random.set_rng_state(before)
    RandomProjector().matrices(_refreshed((24, 40), seed=11), like)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_entries_are_n_0_1_over_r_so_p_p_transpose_is_the_identity_in_expectation():
    """E[P P^T] = r * (1/r) I = I: averaged over 4000 draws each entry is within 0.1 of the
    identity's (standard error sqrt(2 / (r K)) = 0.011); N(0, 1) entries would give 4 I."""
    rank, draws = 4, 4000
    like = torch.zeros((), dtype=torch.float64)
    mean = sum(RandomProjector().matrices(_refreshed((6, 30), seed=s, rank=rank), like)[0] for s in range(draws))
    gram = sum(
        p @ p.T for p in (RandomProjector().matrices(_refreshed((6, 30), seed=s), like)[0] for s in range(draws))
    )
    assert (gram / draws - torch.eye(6, dtype=torch.float64)).abs().max() < 0.1
    assert (mean / draws).abs().max() < 0.05  # centred


@pytest.mark.parametrize(
    "proj_type, shape, low_shape",
    [
        ("std", (24, 40), (4, 40)),
        ("std", (40, 24), (40, 4)),
        ("full", (24, 40), (4, 4)),
        ("reverse_std", (24, 40), (24, 4)),
    ],
)
def test_project_and_back_project_apply_the_regenerated_matrices(proj_type, shape, low_shape):
    state = _refreshed(shape, seed=5, proj_type=proj_type)
    g = _randn(*shape, seed=1).double()
    p, q = RandomProjector().matrices(state, g)
    low = RandomProjector().project(g, state)
    expected = g if p is None else p.T @ g
    expected = expected if q is None else expected @ q
    assert low.shape == low_shape and low.dtype == torch.float64 and torch.allclose(low, expected)
    n = _randn(*low_shape, seed=2).double()
    back = n if p is None else p @ n
    back = back if q is None else back @ q.T
    assert torch.allclose(RandomProjector().back_project(n, state), back)
    assert state.keys() == {"proj_seed", "proj_rank", "proj_rows", "proj_cols", "proj_sides"}
    assert not any(torch.is_tensor(v) for v in state.values())


def _model_and_optimizer(**group):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(24, 40)), torch.nn.Parameter(torch.randn(24, 40))
    opt = GaLoreAdamW([{"params": [a, b], "rank": 4, "proj_method": "random", "update_proj_gap": 2, **group}], lr=1e-2)
    return [a, b], opt


def _step(params, opt, step):
    for i, p in enumerate(params):
        p.grad = _randn(*p.shape, seed=100 * step + i)
    opt.step()


def test_each_parameter_and_each_refresh_draws_its_own_matrix_from_the_group_seed():
    params, opt = _model_and_optimizer(seed=9)
    _step(params, opt, 1)
    seeds = [opt.state[p]["proj_seed"] for p in params]
    assert seeds == [refresh_seed(9, 0, 1), refresh_seed(9, 1, 1)]
    first = [RandomProjector().matrices(opt.state[p], p)[0] for p in params]
    assert not torch.allclose(first[0], first[1], atol=0.1)
    _step(params, opt, 2)  # no refresh: the same matrix
    assert [opt.state[p]["proj_seed"] for p in params] == seeds
    _step(params, opt, 3)  # refreshed at step 3
    assert opt.state[params[0]]["proj_seed"] == refresh_seed(9, 0, 3)
    assert not torch.allclose(RandomProjector().matrices(opt.state[params[0]], params[0])[0], first[0], atol=0.1)
    other_params, other = _model_and_optimizer(seed=10)  # another group seed, another matrix
    _step(other_params, other, 1)
    assert not torch.allclose(
        RandomProjector().matrices(other.state[other_params[0]], params[0])[0], first[0], atol=0.1
    )


def test_resume_from_a_weights_only_state_dict_is_exact_across_a_refresh():
    params, opt = _model_and_optimizer()
    for step in (1, 2):
        _step(params, opt, step)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = GaLoreAdamW(
        [{"params": resumed_params, "rank": 4, "proj_method": "random", "update_proj_gap": 2}], lr=1e-2
    )
    resumed.load_state_dict(copy.deepcopy(saved))
    for step in (3, 4, 5):  # refresh at steps 3 and 5
        _step(params, opt, step)
        _step(resumed_params, resumed, step)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
    assert resumed.state[resumed_params[0]]["proj_seed"] == opt.state[params[0]]["proj_seed"]


def test_the_memory_model_counts_the_regenerated_matrix_as_workspace_not_state():
    params, opt = _model_and_optimizer()
    _step(params, opt, 1)
    group = opt.param_groups[0]
    projector = RandomProjector()
    assert projector.state_bytes((24, 40), torch.float32, group) == 0
    assert projector.workspace_bytes((24, 40), torch.float32, group) == 24 * 4 * 4  # P (m x r), float32
    # P as it multiplies: the float32 draw is freed at its cast, before R exists
    assert projector.workspace_bytes((24, 40), torch.bfloat16, group) == 24 * 4 * 2
    memory = optimizer_memory("", opt)
    svd_params, svd = _model_and_optimizer(proj_method="svd")
    _step(svd_params, svd, 1)
    svd_memory = optimizer_memory("", svd)
    assert memory["projections"] == 0 and svd_memory["projections"] == 2 * 24 * 4 * 4
    assert memory["workspace"] == svd_memory["workspace"] + 24 * 4 * 4
