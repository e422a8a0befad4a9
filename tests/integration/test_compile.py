"""torch.compile with every optimizer of the registry.

The model is compiled once (Dynamo + AOTAutograd, forward and backward; backend ``aot_eager``,
which captures the same graphs inductor would compile but skips inductor's C++ code
generation, 40 CPU-seconds here) and trained with each optimizer from the same initial
weights; losses must match eager within 1e-5. The optimizer sees only the
gradients, which do not depend on the backend.

Compiling the optimizer's ``step`` itself is not supported: traced by Dynamo (torch 2.13) the
step graph-breaks at every host read of the step counter (``int(state["step"])``), re-traces
per parameter, and gave a wrong result (the counter advanced twice on the second call, so
refreshes and bias corrections shifted). The engine therefore marks ``step`` with
``torch.compiler.disable``: ``torch.compile(optimizer.step)`` runs it eagerly, exactly.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import (
    OPTIMIZERS,
    OURS,
    assert_same_state,
    make_optimizer,
    snapshot,
    tiny_llama,
    token_batches,
    train,
)

STEPS = 3


@pytest.fixture(scope="module")
def compiled():
    """(model, compiled model, initial weights): one compilation shared by every optimizer."""
    import torch._dynamo

    model = tiny_llama()
    yield model, torch.compile(model, backend="aot_eager"), snapshot(model)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_model_trains_like_eager(name, compiled):
    model, compiled_model, initial = compiled
    batches = token_batches(STEPS)
    model.load_state_dict(initial)
    eager = train(model, make_optimizer(name, model), batches)
    eager_weights = snapshot(model)
    model.load_state_dict(initial)  # in place: the compiled graph stays valid, no recompilation
    losses = train(compiled_model, make_optimizer(name, model), batches)
    assert losses == pytest.approx(eager, abs=1e-5)
    for key, value in snapshot(model).items():
        torch.testing.assert_close(value, eager_weights[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", OURS)
def test_compiled_optimizer_step_runs_eagerly_and_exactly(name):
    # a counting backend, not torch._dynamo.explain: explain resets Dynamo, which would make the
    # `compiled` fixture's model compile again in the tests after this one
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    twin.load_state_dict(model.state_dict())
    optimizer, twin_optimizer = make_optimizer(name, model), make_optimizer(name, twin)
    x = torch.randn(8, 16)
    traced = CompileCounter()
    compiled_step = torch.compile(twin_optimizer.step, backend=traced)
    for _ in range(3):  # refreshes at steps 1 and 3
        for net, step in ((model, optimizer.step), (twin, compiled_step)):
            net(x).square().mean().backward()
            step()
            net.zero_grad()
    for key, value in twin.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert_same_state(twin_optimizer.state_dict(), optimizer.state_dict())
    assert traced.frame_count == 0  # nothing of the step was traced
