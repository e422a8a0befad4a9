"""One projected parameter's step in three calls, for low-rank gradient accumulation.

``step`` runs them back to back; :mod:`lowmem_optim.layerwise` runs :meth:`SplitStep.begin_step`
on a step's first micro-batch, :meth:`SplitStep.project_gradient` on each, and
:meth:`SplitStep.finish_step` on the sum of the projections after the last, so no full gradient
outlives its micro-batch. A mixin of :class:`~lowmem_optim.engine.ComposedOptimizer`, whose
index (``_entry``), counters (``_advance``) and checks it uses.
"""

from __future__ import annotations

import torch

from lowmem_optim.engine.index import ParamEntry
from lowmem_optim.engine.param_step import finish_projected, next_step, open_step, refresh_if_due, stream_seed
from lowmem_optim.engine.validation import param_label
from lowmem_optim.sharding import store


class SplitStep:
    """``is_projected``, ``begin_step``, ``project_gradient``, ``finish_step``, ``refresh_due``
    and ``draw_seed``: the calls of low-rank accumulation."""

    def is_projected(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is updated in a subspace (its group has a rank below min(m, n))."""
        return self._entry(param, "is_projected").projected

    @torch.compiler.disable
    @torch.no_grad()
    def begin_step(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Start ``param``'s next step: advance its counter and, when a refresh is due, choose
        the subspace from ``grad`` (this gradient alone). Then :meth:`project_gradient` gradients
        onto that subspace and end with :meth:`finish_step`. ValueError for a parameter that is
        not projected, or whose group uses ``error_feedback`` (the feedback needs the whole
        gradient of the step, which this split never holds)."""
        entry = self._split_entry(param, "begin_step")
        self._check_refresh_gradients([(param, grad, entry)])
        s = self._advance(entry)
        refresh_if_due(s, s.matrix(grad))
        store(s.state, s.view, *s.placed)

    @torch.compiler.disable
    @torch.no_grad()
    def project_gradient(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """R = project(G) on ``param``'s current subspace (r x n, m x r or r x r, in ``grad``'s
        dtype); linear in G, so projecting micro-batch gradients and summing equals projecting
        their sum. Call after :meth:`begin_step` of the step."""
        s = open_step(self.state[param], self._split_entry(param, "project_gradient"))
        return s.parts.projector.project(s.matrix(grad), s.view, s.shard)

    @torch.compiler.disable
    @torch.no_grad()
    def finish_step(self, param: torch.Tensor, low: torch.Tensor) -> None:
        """End the step :meth:`begin_step` started from the projected gradient ``low``: the
        rule's update, back-projection, decay and the scaled update applied to ``param``."""
        finish_projected(open_step(self.state[param], self._split_entry(param, "finish_step")), low)

    def refresh_due(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s next :meth:`begin_step` chooses a new subspace."""
        entry = self._entry(param, "refresh_due")
        state = self.state.get(param, {})
        return entry.projected and entry.parts.schedule.due(state, next_step(state))

    def draw_seed(self, param: torch.Tensor, stream: int) -> int:
        """A seed per (group ``seed``, parameter, current step, ``stream``) for random draws
        outside the step (stochastic rounding of an accumulation buffer): the same in every
        hook order, on every rank and after a resume."""
        entry = self._entry(param, "draw_seed")
        step = next_step(self.state.get(param, {})) - 1
        return stream_seed(entry.group["seed"], entry.index, step, stream)

    def _split_entry(self, param: torch.Tensor, caller: str) -> ParamEntry:
        """``param``'s entry, or ValueError naming ``caller`` if its step cannot be split."""
        entry = self._entry(param, caller)
        group = entry.group
        if not entry.projected:
            raise ValueError(
                f"{caller}: {param_label(group, entry.position, param)} is not projected (its group has "
                f"rank={group.get('rank')!r}); step it with step_param"
            )
        if group["error_feedback"] is not None:
            raise ValueError(
                f"{caller}: {param_label(group, entry.position, param)} sits in a group with "
                f"error_feedback={group['error_feedback']!r}, which needs the step's whole gradient; a step "
                "split into projected micro-batches never holds it (allowed: error_feedback=None)"
            )
        if entry.parts.form.needs_gradient:
            raise ValueError(
                f"{caller}: {param_label(group, entry.position, param)} sits in a group with "
                f"update_form={group['update_form']!r}, which scales the step's whole gradient; a step split into "
                "projected micro-batches never holds it (allowed: update_form='projected')"
            )
        return entry
