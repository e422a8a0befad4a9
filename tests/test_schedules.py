import pytest
import torch

from lowmem_optim import GaLoreAdamW
from lowmem_optim.parts import defaults
from lowmem_optim.schedules import AdaptiveRefresh
from tests.helpers.reference import svd_basis


def _stream(fixed: bool, steps: int, m: int = 48, n: int = 24, seed: int = 0):
    """Gradients of a fixed rank-3 subspace (distinct singular values, small noise), or a fresh random one each step."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, 3, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, 3, generator=gen))[0]
    for _ in range(steps):
        if not fixed:
            u = torch.linalg.qr(torch.randn(m, 3, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(n, 3, generator=gen))[0]
        yield u @ torch.diag(torch.tensor([10.0, 5.0, 2.0])) @ v.T + 1e-3 * torch.randn(m, n, generator=gen)


def _refresh_steps(fixed: bool, steps: int, **group):
    w = torch.nn.Parameter(torch.zeros(48, 24))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "refresh": "adaptive", **group}], lr=1e-3)
    done, refreshes = [], 0
    for step, g in enumerate(_stream(fixed, steps), start=1):
        w.grad = g
        opt.step()
        if opt.state[w]["refreshes"] != refreshes:
            refreshes = opt.state[w]["refreshes"]
            done.append(step)
    return done, opt, w


@pytest.mark.parametrize("refresh", ["fixed", "adaptive"])
def test_a_refresh_on_an_all_zero_gradient_is_done_again_at_the_next_step(refresh):
    """An all-zero gradient (what torch.distributed.checkpoint steps on to make state) holds no
    subspace: the next gradient chooses it, whatever the gap."""
    w = torch.nn.Parameter(torch.zeros(48, 24))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 10, "refresh": refresh}], lr=1e-3)
    w.grad = torch.zeros(48, 24)
    opt.step()
    g = next(_stream(True, 1))
    w.grad = g.clone()
    opt.step()
    assert opt.state[w]["refreshes"] == 2
    basis = opt.state[w]["proj_right"].T  # 24 x 2: a right projection
    torch.testing.assert_close(basis.abs().double(), svd_basis(g, 2, "right").abs(), rtol=0, atol=1e-5)


def test_adaptive_gap_doubles_after_each_full_queue_of_similar_subspaces_up_to_max_gap():
    done, opt, w = _refresh_steps(True, 130, update_proj_gap=2, max_gap=12)
    # gap 2 until 5 similarities are queued (refreshes 2-6), then 4, 8, and capped at 12
    assert done == [1, 3, 5, 7, 9, 11, 15, 19, 23, 27, 31, 39, 47, 55, 63, 71, 83, 95, 107, 119]
    assert opt.state[w]["gap"] == 12
    assert opt.layer_stats()[0]["gap"] == 12
    assert opt.layer_stats()[0]["last_similarity"] > 0.99


def test_adaptive_default_max_gap_is_ten_times_the_initial_gap():
    done, opt, w = _refresh_steps(True, 120, update_proj_gap=1)
    gaps = [b - a for a, b in zip(done, done[1:])]
    assert max(gaps) == 10 and gaps[-1] == 10
    assert gaps[:6] == [1, 1, 1, 1, 1, 2]


def test_adaptive_gap_stays_on_a_rotating_subspace():
    done, opt, w = _refresh_steps(False, 40, update_proj_gap=2)
    assert done == list(range(1, 41, 2))
    assert opt.state[w]["gap"] == 2
    assert opt.state[w]["sim_queue"].numel() == 5  # full but below cos_threshold
    assert float(opt.state[w]["sim_queue"].mean()) < 0.4


def test_adaptive_queue_is_cleared_at_growth_so_the_next_growth_needs_fresh_records():
    schedule = AdaptiveRefresh()
    group = {**defaults(schedule), "update_proj_gap": 3, "queue_size": 2, "cos_threshold": 0.5, "gamma_proj": 3}
    state = {}
    schedule.record(state, 1, group, None)
    schedule.record(state, 4, group, 0.9)
    assert state["gap"] == 3 and state["sim_queue"][: state["sim_count"]].tolist() == [0.9]
    schedule.record(state, 7, group, 0.2)  # mean 0.55 >= 0.5: grows by gamma_proj, queue cleared
    assert state["gap"] == 9 and state["sim_count"] == 0 and state["next_refresh"] == 16
    schedule.record(state, 16, group, 1.0)
    assert state["gap"] == 9 and state["refreshes"] == 4


@pytest.mark.parametrize(
    "key, value",
    [
        ("queue_size", 0),
        ("queue_size", 2.5),
        ("cos_threshold", 1.5),
        ("cos_threshold", -0.1),
        ("gamma_proj", 0.5),
        ("max_gap", 1),
        ("max_gap", 3.0),
    ],
)
def test_adaptive_rejects_bad_hyperparameters_by_name(key, value):
    w = torch.nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(ValueError, match=key):
        GaLoreAdamW([{"params": [w], "rank": 2, "refresh": "adaptive", "update_proj_gap": 2, key: value}])


def test_unknown_refresh_is_rejected_listing_the_schedules():
    w = torch.nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(ValueError, match="adaptive"):
        GaLoreAdamW([{"params": [w], "rank": 2, "refresh": "lazy"}])


def _staggered_run(steps: int, resume_at: int | None = None, gap: int = 4, refresh: str = "fixed"):
    """12 projected matrices and a bias; which matrices refresh at each step, and the final weights."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(16, 12, generator=gen)) for _ in range(12)]
    bias = torch.nn.Parameter(torch.zeros(12))
    grads = [[torch.randn(16, 12, generator=gen) for _ in weights] for _ in range(steps)]

    def build(params):
        return GaLoreAdamW(
            [
                {"params": params[:6], "rank": 2, "update_proj_gap": gap, "stagger": True, "refresh": refresh},
                {"params": [bias]},
                {"params": params[6:], "rank": 2, "update_proj_gap": gap, "stagger": True, "refresh": refresh},
            ],
            lr=1e-2,
        )

    opt, seen, per_step = build(weights), [0] * 12, []
    for step in range(1, steps + 1):
        if step == resume_at:
            saved = opt.state_dict()
            opt = build(weights)
            opt.load_state_dict(saved)
        for w, g in zip(weights, grads[step - 1]):
            w.grad = g
        bias.grad = torch.ones(12)
        opt.step()
        now = [opt.state[w]["refreshes"] for w in weights]
        per_step.append([i for i in range(12) if now[i] != seen[i]])
        seen = now
    return per_step, [w.detach().clone() for w in weights]


def test_staggered_refresh_spreads_the_matrices_over_the_gap_and_resumes_exactly():
    per_step, final = _staggered_run(13)
    assert per_step[0] == list(range(12))  # step 1: every matrix needs a first subspace
    assert all(len(done) <= 3 for done in per_step[1:])  # ceil(12 matrices / gap 4)
    assert sorted(i for done in per_step[1:5] for i in done) == list(range(12))  # each once per gap
    for i in range(12):
        steps = [s for s, done in enumerate(per_step, start=1) if i in done]
        assert all(b - a == 4 for a, b in zip(steps[1:], steps[2:]))  # then every gap
    resumed_steps, resumed = _staggered_run(13, resume_at=6)
    assert resumed_steps == per_step and all(torch.equal(a, b) for a, b in zip(final, resumed))


def test_staggered_adaptive_refresh_also_spreads_after_step_one():
    per_step, _ = _staggered_run(6, refresh="adaptive")
    assert per_step[0] == list(range(12)) and all(len(done) <= 3 for done in per_step[1:])
