"""FSDP2-sharded parameters (``Shard(0)`` DTensors on a 1-D mesh) on 2 gloo processes: every
optimizer of the package, every projector, both projection sides, INT4/INT8 projections, the
fixed and adaptive schedules, the 8-bit rule, error feedback and the update forms give the
unsharded optimizer's parameters on the same gradients; sharded state is smaller per rank; each rank sends, per
step, the bytes lowmem_optim.tools.traffic predicts from the shapes and group keys; DCP checkpoints resume
exactly and load across world sizes 2 -> 1 and 1 -> 2; other placements are refused by name.
Two cases also run on 4 processes.

One launch of 2 processes runs every case (starting processes is the expensive part); each
rank steps a sharded copy and, on the same whole gradients, an unsharded reference, and writes
what it measured for the tests below to check.
"""

from __future__ import annotations

import json
import math
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowmem_optim import sharding
from lowmem_optim.registry import MATRIX_OPTIMIZERS, get_optimizer_class
from lowmem_optim.shapes import uses_projection
from lowmem_optim.tools.traffic import predicted_bytes, step_bytes
from tests.helpers.gloo import end_group

STEPS = 4  # with update_proj_gap=2: refreshes at steps 1 and 3
SAVED = 2  # the step after which checkpoints are saved: resuming crosses the refresh at step 3
TOLERANCE = 1e-5  # max |sharded - unsharded| / max |unsharded|, per parameter
EF_TOLERANCE = 5e-2  # a quantized feedback buffer whose blocks straddle two ranks (4-bit on odd: 3e-2)
#: state of block statistics cut per rank: what a load on another world size may refuse, by name
BLOCK_KEYS = (
    "exp_avg_absmax",
    "exp_avg_sq_absmax",
    "ef_absmax",
    "ef_scale",
    "ef_zero",
    "ef_nf4_absmax",
    "momentum_absmax",
    "momentum_nf4_absmax",
)

#: (shape, in the low-rank / matrix group): tall (right projection, each rank's rank-4 moments
#: one 256-value block), wide (left projection), odd rows (uneven split), and full-rank ones
SHAPES: dict[str, tuple[tuple[int, ...], bool]] = {
    "tall": ((128, 24), True),
    "wide": ((24, 128), True),
    "odd": ((37, 20), True),
    "table": ((256, 8), False),
    "bias": ((64,), False),
}

LOWRANK = {"rank": 4, "update_proj_gap": 2}

#: case -> (optimizer, group keys, constructor keys, per-parameter tolerance overrides)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, float]]] = {
    "galore_adamw svd": ("galore_adamw", LOWRANK, {}, {}),
    # both sides: R = P^T G Q is diagonal up to rounding after a refresh, and Adam's first step is
    # about sign(R), so eps keeps rounding-level entries from each deciding a whole +-lr step
    "galore_adamw svd full": ("galore_adamw", {**LOWRANK, "proj_type": "full"}, {"eps": 1e-2}, {}),
    "galore_adamw randomized_svd": ("galore_adamw", {**LOWRANK, "proj_method": "randomized_svd"}, {}, {}),
    # a Gaussian P regenerated from the seed: each rank draws it whole and keeps its rows (wide)
    "galore_adamw random": ("galore_adamw", {**LOWRANK, "proj_method": "random"}, {}, {}),
    # the gradient scaled per channel (columns of a left projection, the weight's rows of a right one)
    # and per tensor (norms summed over the ranks), with the norm-growth limiter
    "apollo": ("apollo", LOWRANK, {}, {}),
    "apollo_mini": ("apollo_mini", {**LOWRANK, "rank": 1}, {}, {}),
    "galore_adamw svd int4": ("galore_adamw", {**LOWRANK, "proj_bits": 4, "proj_group_size": 32}, {}, {}),
    "galore_adamw svd int8": ("galore_adamw", {**LOWRANK, "proj_bits": 8, "proj_group_size": 32}, {}, {}),
    # bfloat16 weights: R's partial sums all-reduced in bfloat16 round apart from the one-process
    # product, and a weight moves by a step of its own rounding: within two ulps of the largest
    "galore_adamw svd bf16 weights": ("galore_adamw", LOWRANK, {}, dict.fromkeys(SHAPES, 2**-6)),
    "dct_adamw bf16 weights": ("dct_adamw", {**LOWRANK, "error_feedback": None}, {}, dict.fromkeys(SHAPES, 2**-6)),
    # each matrix refreshes at its own step after the first: steps that mix refreshing and plain parameters
    "galore_adamw svd stagger": ("galore_adamw", {**LOWRANK, "stagger": True}, {}, {}),
    "galore_adamw adaptive": (
        "galore_adamw",
        {**LOWRANK, "refresh": "adaptive", "queue_size": 1, "cos_threshold": 0.0},
        {},
        {},
    ),
    # DCT without its default error feedback (the cases below add it)
    "dct_adamw l1": ("dct_adamw", {**LOWRANK, "error_feedback": None}, {}, {}),
    "dct_adamw l2 reverse_std": (
        "dct_adamw",
        {**LOWRANK, "proj_type": "reverse_std", "error_feedback": None},
        {"dct_score": "l2"},
        {},
    ),
    "galore_adafactor": ("galore_adafactor", LOWRANK, {}, {}),
    "galore_adafactor beta1": ("galore_adafactor", LOWRANK, {"beta1": 0.9}, {}),
    # R's rows split for the first moment: a later DCT refresh gathers it and the row statistic to move them
    "galore_adafactor beta1 dct": ("galore_adafactor", {**LOWRANK, "proj_method": "dct"}, {"beta1": 0.9}, {}),
    "galore_adamw8bit": ("galore_adamw8bit", LOWRANK, {}, {}),
    "q_galore_adamw8bit": ("q_galore_adamw8bit", {**LOWRANK, "proj_group_size": 32}, {}, {}),
    # every moment in 8-bit codes: blocks cut per rank match the whole tensor's where each rank
    # holds whole 256-value blocks (tall, wide, table); odd and bias cut theirs differently
    "q_galore_adamw8bit 8-bit everywhere": (
        "q_galore_adamw8bit",
        {**LOWRANK, "proj_group_size": 32},
        {"min_8bit_size": 0},
        {"odd": 2e-2, "bias": 2e-2},
    ),
    # error feedback: the buffer E keeps each rank's rows; quantized, its blocks are cut per rank, the
    # unsharded ones where a rank's rows fill whole 256-value blocks (tall, wide), not on odd's 19 x 20
    "galore_adamw error feedback": ("galore_adamw", {**LOWRANK, "error_feedback": "float32"}, {}, {}),
    "galore_adamw randomized_svd 8-bit error feedback": (
        "galore_adamw",
        {**LOWRANK, "proj_method": "randomized_svd", "error_feedback": "8bit"},
        {},
        {"odd": EF_TOLERANCE},
    ),
    "dct_adamw 4-bit error feedback": ("dct_adamw", {**LOWRANK, "error_feedback": "4bit"}, {}, {"odd": EF_TOLERANCE}),
    "dct_adamw nf4 error feedback": ("dct_adamw", {**LOWRANK, "error_feedback": "nf4"}, {}, {"odd": EF_TOLERANCE}),
    "dct_adamw 4-bit error feedback left": (
        "dct_adamw",
        {**LOWRANK, "proj_type": "left", "error_feedback": "4bit"},
        {},
        {"odd": EF_TOLERANCE},
    ),
    # full-size updates from low-rank state: the per-channel norms are local (a left projection's R
    # and N are whole on every rank, a right one's rows the weight's); ||S|| is summed over the ranks
    "fira svd": ("fira", LOWRANK, {}, {}),
    "fira dct": ("fira", {**LOWRANK, "proj_method": "dct"}, {}, {}),
    "galore_adamw channel": ("galore_adamw", {**LOWRANK, "update_form": "channel"}, {}, {}),
    "galore_adamw tensor": ("galore_adamw", {**LOWRANK, "update_form": "tensor"}, {}, {}),
    "auon": ("auon", {}, {}, {}),
    "auon low-rank": ("auon", LOWRANK, {}, {}),
    "auon low-rank dct": ("auon", {**LOWRANK, "proj_method": "dct", "error_feedback": None}, {}, {}),
    "hybrid_auon": ("hybrid_auon", {}, {"ns_dtype": "float32"}, {}),
    "muon": ("muon", {}, {"ns_dtype": "float32"}, {}),
    "muon bf16": ("muon", {}, {}, {}),
    # SinkGD's column norms are summed over the ranks; SCALE's row norms are each rank's own
    "sinkgd": ("sinkgd", {}, {}, {}),
    "sinkgd low-rank": ("sinkgd", LOWRANK, {}, {}),
    "scale_sgd momentum": ("scale_sgd", {}, {"momentum": 0.9}, {}),
    # the momentum stochastically rounded: each value draws as in the whole tensor; 8-bit blocks are
    # cut on each rank's rows, the whole tensor's where they fill whole blocks (tall, wide; not odd)
    "muon momentum bfloat16": ("muon", {"momentum_dtype": "bfloat16"}, {"ns_dtype": "float32"}, {}),
    "muon momentum 8bit": ("muon", {"momentum_dtype": "8bit"}, {"ns_dtype": "float32"}, {"odd": 2e-2}),
    "auon low-rank momentum 8bit": ("auon", {**LOWRANK, "momentum_dtype": "8bit"}, {}, {"odd": 2e-2}),
    # 4-bit codes: blocks of 64 values of each rank's rows (tall's and wide's 1536: whole blocks; odd's
    # straddling blocks move its weight by up to 2.4% of its largest value)
    "muon momentum 4bit": ("muon", {"momentum_dtype": "4bit"}, {"ns_dtype": "float32"}, {"odd": EF_TOLERANCE}),
}


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 0.1 for name, (shape, _) in SHAPES.items()}


def _gradient(name: str, step: int) -> torch.Tensor:
    """A gradient with a decaying spectrum (distinct singular values) and a slowly moving subspace."""
    shape = SHAPES[name][0]
    g = torch.Generator().manual_seed(1000 * step + list(SHAPES).index(name))
    if len(shape) == 1:
        return torch.randn(shape, generator=g)
    m, n = shape
    k = min(m, n)
    base = torch.Generator().manual_seed(list(SHAPES).index(name))
    u, v = torch.randn(m, k, generator=base), torch.randn(k, n, generator=base)
    decay = torch.logspace(0, -2, k)[:, None]
    return u @ (decay * v) + 0.05 * torch.randn(m, n, generator=g)


#: cases whose weights (and so gradients, R and the update's collectives) are bfloat16
BF16_WEIGHTS = ("galore_adamw svd bf16 weights", "dct_adamw bf16 weights")


def _model(case: str, seed: int = 0) -> Params:
    dtype = torch.bfloat16 if case in BF16_WEIGHTS else torch.float32
    return Params({name: value.to(dtype) for name, value in _weights(seed).items()})


class Params(nn.Module):
    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, value in values.items():
            self.register_parameter(name, nn.Parameter(value.clone()))


def _optimizer(case: str, model: nn.Module):
    name, group_keys, ctor, _ = CASES[case]
    matrices = [n for n, (_, lowrank) in SHAPES.items() if lowrank]
    rest = [n for n in SHAPES if n not in matrices]
    params = dict(model.named_parameters())
    rest_group = {"params": [params[n] for n in rest], "param_names": rest}
    matrix_group = {"params": [params[n] for n in matrices], "param_names": matrices, **group_keys}
    cls = get_optimizer_class(name)
    if name in MATRIX_OPTIMIZERS:
        rest_group["rule"] = "adam"
    return cls([rest_group, matrix_group], **{"lr": 1e-2, **ctor} if name != "galore_adafactor" else ctor)


def _shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.tensor import Shard, distribute_tensor

    for name, p in list(model.named_parameters()):
        setattr(model, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
    return model


def _step(model: nn.Module, optimizer, step: int, mesh=None) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    for name, p in model.named_parameters():
        grad = _gradient(name, step).to(p.dtype)
        p.grad = grad if mesh is None else distribute_tensor(grad, mesh, [Shard(0)])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if sharding.is_dtensor(p) else p).detach().clone()


def _errors(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    errors = {}
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        a, b = _full(p), _full(q)
        errors[name] = float((a - b).abs().max() / b.abs().max())
    return errors


def _state_bytes(optimizer) -> int:
    return sum(sharding.local_bytes(v) for s in optimizer.state.values() for v in s.values())


def _dcp_state(model: nn.Module, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def _dcp_load(model: nn.Module, optimizer, checkpoint: str) -> None:
    """Resume as torchtitan does: a fresh model and optimizer's state dicts are the template."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    template = _dcp_state(model, optimizer)
    dcp.load(template, checkpoint_id=checkpoint)
    set_model_state_dict(model, template["model"])
    set_optimizer_state_dict(model, optimizer, template["optim"])


def _resume_error(case: str, checkpoint: str, mesh, uninterrupted: nn.Module) -> dict[str, Any]:
    """Load ``checkpoint`` (saved after step ``SAVED``) into a fresh copy and step on to
    ``STEPS``: the largest difference to ``uninterrupted``, or the error that refused the load."""
    model = _model(case, seed=1)  # other weights: the load must overwrite them
    model = model if mesh is None else _shard(model, mesh)
    optimizer = _optimizer(case, model)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        _dcp_load(model, optimizer, checkpoint)
    except (Exception, CheckpointException) as err:  # what a refused load says is checked by the test
        return {"refused": f"{type(err).__name__}: {err}"[-600:]}
    for step in range(SAVED + 1, STEPS + 1):
        _step(model, optimizer, step, mesh)
    return {"errors": _errors(model, uninterrupted)}


def _refreshes(optimizer) -> dict[torch.Tensor, int]:
    """How many subspaces each projected parameter has chosen so far (its schedule's count)."""
    return {
        p: int(optimizer.state[p].get("refreshes", 0))
        for group in optimizer.param_groups
        for p in group["params"]
        if uses_projection(p, group)
    }


def _refreshing(before: dict[torch.Tensor, int], after: dict[torch.Tensor, int]) -> dict[torch.Tensor, str]:
    """The parameters that chose a subspace in a step, with :func:`~lowmem_optim.tools.traffic.step_bytes`'s
    kind of that choice: ``refresh`` for a first subspace, ``later_refresh`` for a later one."""
    return {p: "refresh" if n == 1 else "later_refresh" for p, n in after.items() if n != before.get(p, 0)}


def _step_kinds(refreshing: list[dict[torch.Tensor, str]], projected: int) -> list[str]:
    """Per step, which of :class:`~lowmem_optim.tools.traffic.PredictedTraffic`'s steps it was:
    ``step`` where no projected parameter chose a subspace, ``refresh`` / ``later_refresh`` where
    every one chose its first / a later one; ``mixed`` otherwise (``stagger``)."""
    kinds = []
    for chose in refreshing:
        if not chose:
            kinds.append("step")
        elif len(chose) == projected and len(set(chose.values())) == 1:
            kinds.append(next(iter(chose.values())))
        else:
            kinds.append("mixed")
    return kinds


def _run_case(case: str, mesh, workdir: Path) -> dict[str, Any]:
    """Sharded and unsharded side by side, saving the sharded one with DCP after step ``SAVED``; then
    that checkpoint resumed on the same world size, and a one-process checkpoint resumed sharded."""
    import torch.distributed.checkpoint as dcp

    reference = _model(case)
    reference_opt = _optimizer(case, reference)
    model = _shard(_model(case), mesh)
    optimizer = _optimizer(case, model)
    directory = workdir / case.replace(" ", "_")
    sent, refreshing, predicted_steps = [], [], []
    for step in range(1, STEPS + 1):
        _step(reference, reference_opt, step)
        before = _refreshes(optimizer)
        with sharding.count_traffic() as traffic:
            _step(model, optimizer, step, mesh)
        sent.append(traffic.sent)
        refreshing.append(_refreshing(before, _refreshes(optimizer)))
        predicted_steps.append(step_bytes(optimizer, mesh.size(), refreshing[-1]))
        if step == SAVED:
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(directory / "sharded"))
    result = {
        "sent": sent,
        "step_kinds": _step_kinds(refreshing, len(_refreshes(optimizer))),
        "predicted": predicted_bytes(optimizer, mesh.size())._asdict(),
        "predicted_steps": predicted_steps,
        "errors": _errors(model, reference),
        "state_bytes": _state_bytes(optimizer),
        "reference_state_bytes": _state_bytes(reference_opt),
        "sharded_keys": {
            name: sorted(key for key, value in optimizer.state[p].items() if sharding.is_dtensor(value))
            for name, p in model.named_parameters()
        },
    }
    result["resumed"] = _resume_error(case, str(directory / "sharded"), mesh, model)
    result["from_one_process"] = _resume_error(case, str(directory / "one_process"), mesh, reference)
    return result


#: DTensor placements other than FSDP2's Shard(0) on a 1-D mesh (the uneven torch.chunk split of
#: FSDP2 is the "odd" shape above): each is refused when the optimizer is built
PLACEMENTS = ("Shard(1)", "Replicate", "Partial", "HSDP (Replicate, Shard(0)) on a 2-D mesh", "Shard(0) split 10 + 27")
REFUSED_BY = {"galore_adamw": LOWRANK, "muon": {}}  # optimizer -> its group keys


def _placed(placement: str, whole: torch.Tensor, mesh, hsdp_mesh) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    if placement == "Shard(1)":
        return distribute_tensor(whole, mesh, [Shard(1)])
    if placement == "Replicate":
        return distribute_tensor(whole, mesh, [Replicate()])
    if placement == "Partial":
        return DTensor.from_local(whole / mesh.size(), mesh, [Partial()])
    if placement.startswith("HSDP"):
        return distribute_tensor(whole, hsdp_mesh, [Replicate(), Shard(0)])
    rows = (0, 10, 37)[mesh.get_local_rank() : mesh.get_local_rank() + 2]
    return DTensor.from_local(whole[rows[0] : rows[1]], mesh, [Shard(0)], shape=whole.shape, stride=whole.stride())


def _placements(mesh) -> dict[str, dict[str, str]]:
    """Per placement and optimizer, what building the optimizer on an "odd" weight so placed said."""
    from torch.distributed.device_mesh import init_device_mesh

    hsdp_mesh = init_device_mesh("cpu", (1, mesh.size()), mesh_dim_names=("replicate", "shard"))
    out: dict[str, dict[str, str]] = {}
    for placement in PLACEMENTS:
        weight = nn.Parameter(_placed(placement, _weights()["odd"], mesh, hsdp_mesh))
        out[placement] = {}
        for name, keys in REFUSED_BY.items():
            try:
                get_optimizer_class(name)([{"params": [weight], "param_names": ["odd"], **keys}])
                out[placement][name] = "accepted"
            except ValueError as err:
                out[placement][name] = str(err)
    return out


def _one_process_checkpoints(workdir: Path, cases) -> None:
    """Each case's unsharded optimizer after step ``SAVED``, saved with DCP by one process."""
    import torch.distributed.checkpoint as dcp

    for case in cases:
        model = _model(case)
        optimizer = _optimizer(case, model)
        for step in range(1, SAVED + 1):
            _step(model, optimizer, step)
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(workdir / case.replace(" ", "_") / "one_process"))


def _worker(rank: int, world: int, workdir: str, cases: tuple[str, ...]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    # a rank left waiting in a collective fails after COLLECTIVE_TIMEOUT instead of gloo's 30 minutes
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, Any] = {}
    finished = False
    try:
        for case in cases:
            try:
                results[case] = _run_case(case, mesh, Path(workdir))
            except Exception:  # reported by the test, per case
                results[case] = {"error": traceback.format_exc(limit=-4)}
            dist.barrier()
        if world == 2:
            results["placements"] = _placements(mesh)
        finished = True
    finally:
        end_group(barrier=finished)  # no rank tears gloo down while a peer is still at work
        Path(workdir, f"rank{rank}.json").write_text(json.dumps(results))


#: one launch runs every case: about 20 s on an idle 2-core machine, minutes on a loaded one
pytestmark = pytest.mark.timeout(900)
COLLECTIVE_TIMEOUT = timedelta(seconds=300)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("sharded")
    _one_process_checkpoints(workdir, CASES)
    mp.spawn(_worker, args=(2, str(workdir), tuple(CASES)), nprocs=2, join=True)
    results = [json.loads((workdir / f"rank{rank}.json").read_text()) for rank in range(2)]
    for case in CASES:  # 2 -> 1: the sharded checkpoint resumed in this one process
        reference = _model(case)
        optimizer = _optimizer(case, reference)
        for step in range(1, STEPS + 1):
            _step(reference, optimizer, step)
        checkpoint = str(workdir / case.replace(" ", "_") / "sharded")
        results[0][case]["to_one_process"] = _resume_error(case, checkpoint, None, reference)
    return results


#: on 4 processes: both projection sides, R's 4 rows one per rank, 37 rows as 10 + 10 + 10 + 7
FOUR_RANK_CASES = ("galore_adamw svd", "dct_adamw 4-bit error feedback left")


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> list[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("sharded4")
    _one_process_checkpoints(workdir, FOUR_RANK_CASES)
    mp.spawn(_worker, args=(4, str(workdir), FOUR_RANK_CASES), nprocs=4, join=True)
    return [json.loads((workdir / f"rank{rank}.json").read_text()) for rank in range(4)]


@pytest.mark.parametrize("case", FOUR_RANK_CASES)
def test_four_ranks_give_the_unsharded_parameters_and_resume_exactly(four_ranks, case):
    tolerances = CASES[case][3]
    for rank, result in enumerate(_case_results(four_ranks, case)):
        _assert_close(result["errors"], tolerances, rank)
        assert all(error == 0 for error in result["resumed"]["errors"].values()), (rank, result["resumed"])
        load = result["from_one_process"]
        if "refused" in load:  # only block statistics cut per rank may refuse
            assert tolerances and any(key in load["refused"] for key in BLOCK_KEYS), (rank, load["refused"])
        else:
            _assert_close(load["errors"], tolerances, f"1 -> 4 rank {rank}")


def _case_results(two_ranks: list[dict[str, Any]], case: str) -> list[dict[str, Any]]:
    for rank, results in enumerate(two_ranks):
        assert "error" not in results[case], f"rank {rank}: {results[case].get('error')}"
    return [results[case] for results in two_ranks]


def _assert_close(errors: dict[str, float], tolerances: dict[str, float], where: Any) -> None:
    for name, error in errors.items():
        assert math.isfinite(error) and error <= tolerances.get(name, TOLERANCE), (where, name, error)


@pytest.mark.parametrize("case", CASES)
def test_sharded_step_gives_the_unsharded_parameters(two_ranks, case):
    for rank, result in enumerate(_case_results(two_ranks, case)):
        _assert_close(result["errors"], CASES[case][3], rank)


#: the steps of a case with projected parameters under update_proj_gap=2: the first subspace at step 1,
#: a later one at step 3 (the adaptive case's gap grows only after that refresh)
LOWRANK_STEP_KINDS = ["refresh", "step", "later_refresh", "step"]
#: with stagger the three matrices (slots 0, 1, 2) refresh next at steps 3, 2, 3, then every 2 steps
STAGGERED_STEP_KINDS = ["refresh", "mixed", "mixed", "mixed"]


def _expected_kinds(case: str) -> list[str]:
    keys = CASES[case][1]
    if "rank" not in keys:
        return ["step"] * STEPS
    return STAGGERED_STEP_KINDS if keys.get("stagger") else LOWRANK_STEP_KINDS


def _assert_sent_as_predicted(results: list[dict[str, Any]], case: str) -> None:
    """Every rank sends, at each step, the bytes lowmem_optim.tools.traffic predicts from the shapes
    and group keys for the parameters that refresh in it (read from the schedules' counts), and
    where they refresh together, the bytes of that kind of step."""
    for rank, result in enumerate(results):
        kinds = result["step_kinds"]
        assert kinds == _expected_kinds(case), (rank, kinds)
        assert result["sent"] == result["predicted_steps"], (rank, kinds, result["sent"], result["predicted_steps"])
        together = [(sent, result["predicted"][kind]) for sent, kind in zip(result["sent"], kinds) if kind != "mixed"]
        assert together and all(sent == predicted for sent, predicted in together), (rank, kinds, together)


@pytest.mark.parametrize("case", CASES)
def test_bytes_sent_per_step_are_the_predicted(two_ranks, case):
    _assert_sent_as_predicted(_case_results(two_ranks, case), case)


@pytest.mark.parametrize("case", FOUR_RANK_CASES)
def test_bytes_sent_per_step_on_four_ranks_are_the_predicted(four_ranks, case):
    _assert_sent_as_predicted(_case_results(four_ranks, case), case)


@pytest.mark.parametrize("case", CASES)
def test_sharded_state_takes_less_than_the_unsharded_per_rank(two_ranks, case):
    for result in _case_results(two_ranks, case):
        assert 0 < result["state_bytes"] < result["reference_state_bytes"]


@pytest.mark.parametrize("case", CASES)
def test_dcp_resume_on_the_same_world_size_is_exact(two_ranks, case):
    for rank, result in enumerate(_case_results(two_ranks, case)):
        assert "refused" not in result["resumed"], (rank, result["resumed"])
        assert all(error == 0 for error in result["resumed"]["errors"].values()), (rank, result["resumed"])


@pytest.mark.parametrize("case", CASES)
def test_dcp_checkpoints_load_across_world_sizes_or_name_what_cannot(two_ranks, case):
    tolerances = CASES[case][3]
    loads = [(f"1 -> 2 rank {rank}", r["from_one_process"]) for rank, r in enumerate(_case_results(two_ranks, case))]
    loads.append(("2 -> 1", two_ranks[0][case]["to_one_process"]))
    for where, load in loads:
        if "refused" in load:
            assert tolerances, (where, load["refused"])  # only block statistics cut per rank may refuse
            assert any(key in load["refused"] for key in BLOCK_KEYS), (where, load["refused"])
        else:
            _assert_close(load["errors"], tolerances, where)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_other_placements_are_refused_naming_the_parameter_and_fsdp2s(two_ranks, placement):
    for rank, results in enumerate(two_ranks):
        for name in REFUSED_BY:
            said = results["placements"][placement][name]
            assert "'odd'" in said and "allowed: Shard(0) on a 1-D mesh" in said, (rank, name, said)


#: case -> parameter -> state entries kept as each rank's rows: wide is projected on the left
#: (P and the moments of R's rows), tall on the right, Muon's momentum is the weight's
SHARDED_ENTRIES = {
    "galore_adamw svd": {"wide": {"exp_avg", "exp_avg_sq", "proj_left"}, "tall": {"exp_avg", "exp_avg_sq"}},
    "galore_adamw error feedback": {"wide": {"exp_avg", "exp_avg_sq", "proj_left", "ef"}},
    "dct_adamw 4-bit error feedback left": {"tall": {"exp_avg", "exp_avg_sq", "ef_codes", "ef_scale", "ef_zero"}},
    "muon": {name: {"momentum_buffer"} for name in ("tall", "wide", "odd")},
    "scale_sgd momentum": {name: {"momentum_buffer"} for name in ("tall", "wide", "odd")},
    "muon momentum 8bit": {name: {"momentum_codes", "momentum_absmax"} for name in ("tall", "wide", "odd")},
    "muon momentum 4bit": {name: {"momentum_nf4_codes", "momentum_nf4_absmax"} for name in ("tall", "wide", "odd")},
}


@pytest.mark.parametrize("case", SHARDED_ENTRIES)
def test_state_entries_are_kept_as_each_ranks_rows(two_ranks, case):
    for rank, result in enumerate(_case_results(two_ranks, case)):
        for name, keys in SHARDED_ENTRIES[case].items():
            assert keys <= set(result["sharded_keys"][name]), (rank, name, result["sharded_keys"][name])
