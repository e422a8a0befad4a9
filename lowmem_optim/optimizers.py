"""The named optimizers: which parts of the engine each composes, with its papers' defaults.

Each class is a declaration: the parts its groups may use (``part_choices``; one choice fixes
that part), its own defaults over its parts' (``named_defaults``), its registry name and the
hyperparameters it also takes by position (``leading``); no class repeats an ``__init__``.
Every hyperparameter is a key declared by one of its parts (:mod:`lowmem_optim.parts`):
accepted as a keyword argument and as a param group key, and listed with its default at the
end of the class docstring. The loop is :class:`~lowmem_optim.engine.ComposedOptimizer`'s.
Param groups follow galore-torch: a group with ``rank`` is projected (keys ``rank``,
``update_proj_gap``, ``scale``, ``proj_type``, ...), a group without it gets the plain
full-rank rule. Hyperparameter names and defaults follow ``torch.optim.AdamW`` (note:
galore-torch's GaLoreAdamW defaulted to ``weight_decay=0`` and ``eps=1e-6``; ours are torch's
``1e-2`` and ``1e-8``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any, ClassVar

from lowmem_optim.engine import ComposedOptimizer, declared_defaults
from lowmem_optim.rules.adam import AdamRule


class NamedOptimizer(ComposedOptimizer):
    """Base of the named optimizers, which are declarations only: ``part_choices``,
    ``named_defaults``, ``registry_name`` and ``leading``, the hyperparameters also taken by
    position after ``params`` (in the order of the optimizer they follow: ``torch.optim.AdamW``,
    HF's ``Adafactor``), each defaulting to its part's declaration. The class's signature lists
    them with those defaults (where its default parts declare them all)."""

    #: the hyperparameters taken by position after ``params``
    leading: ClassVar[tuple[str, ...]] = ()
    #: keys of the low-rank group that :func:`lowmem_optim.build_optimizer` fills where the
    #: caller gives none (APOLLO-Mini's rank 1)
    lowrank_defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        defaults = declared_defaults(cls)
        if not defaults.keys() >= set(cls.leading):  # a base whose default parts do not read them all
            return
        init = inspect.signature(cls.__init__)
        params = []
        for p in list(init.parameters.values())[1:]:  # after self
            if p.kind is p.VAR_POSITIONAL:
                params += [inspect.Parameter(n, p.POSITIONAL_OR_KEYWORD, default=defaults[n]) for n in cls.leading]
            else:
                params.append(p)
        cls.__signature__ = init.replace(parameters=params, return_annotation=inspect.Signature.empty)

    def __init__(self, params: Iterable[Any], *args: Any, **hparams: Any) -> None:
        if len(args) > len(self.leading):
            raise TypeError(
                f"{type(self).__name__}() takes {len(self.leading) + 1} positional arguments "
                f"(params, {', '.join(self.leading)}) but {len(args) + 1} were given"
            )
        for name, value in zip(self.leading, args):
            if name in hparams:
                raise TypeError(f"{type(self).__name__}() got multiple values for argument {name!r}")
            hparams[name] = value
        super().__init__(params, hparams)


class AdamWFamily(NamedOptimizer):
    """Base of the optimizers with an Adam rule: ``torch.optim.AdamW``'s leading arguments."""

    leading = ("lr", "betas", "eps", "weight_decay")


class GaLoreAdamW(AdamWFamily):
    """GaLore with AdamW in the subspace (Zhao et al., ICML 2024, arXiv 2403.03507).

    For a low-rank group, with P the top-r singular vectors of G refreshed every
    ``update_proj_gap`` steps:  R = P^T G;  N = Adam(R);  W <- W (1 - lr wd) - scale * P N.
    ``rank`` given here applies to every group that does not override it (use it only when
    every parameter is a matrix); normally pass it per group, e.g. via
    :func:`lowmem_optim.lowrank_param_groups`.
    """

    registry_name = "galore_adamw"
    part_choices = {"rule": ("adam",)}


class DCTAdamW(AdamWFamily):
    """AdamW in a DCT subspace: SVD-free GaLore (Modoranu et al., arXiv 2505.17967).

    For a low-rank group, with I the r orthonormal DCT-II vectors that score highest on
    A = G + E (L1 norm of the spectrum's columns, ``dct_score="l2"`` for the exact error
    minimizer): R = A Q_I (read from the spectrum);  E <- A - R Q_I^T;  N = Adam(R);
    W <- W (1 - lr wd) - scale * N Q_I^T. As in the authors' code the subspace is chosen again
    every step (``update_proj_gap=1``, cheap since no SVD is done) with ``scale=1``; unlike it,
    the moments of indices that stay selected move with them and new ones start at zero
    (``dct_keep_moments``), and the part each step discards is fed back by default
    (``error_feedback="nf4"``: a 4-bit NormalFloat buffer, 0.52 bytes per projected weight;
    :mod:`lowmem_optim.projection.feedback`). On our CPU training benchmark this recipe (at lr
    2.5e-3) is 5.1% behind GaLore with an exact SVD in validation loss over three seeds, with 1.9%
    less optimizer state (a min-max 4-bit buffer, ``"4bit"``: 5.3%); ``error_feedback=None`` is
    the paper's method (10.8% behind). See
    :mod:`lowmem_optim.projection.dct` and docs/benchmarks.md.
    """

    registry_name = "dct_adamw"
    part_choices = {"rule": ("adam",), "proj_method": ("dct",)}
    named_defaults = {"update_proj_gap": 1, "scale": 1.0, "error_feedback": "nf4"}


class APOLLO(AdamWFamily):
    """APOLLO (Zhu et al., MLSys 2025, arXiv 2412.05270): AdamW's element-wise scaling
    coarsened to one factor per channel, estimated in a random subspace.

    For a low-rank group, with P (m x r, entries N(0, 1/r)) regenerated from a seed refreshed
    every ``update_proj_gap`` steps and never stored (:mod:`lowmem_optim.projection.random`):
    R = P^T G;  N = Adam(R) (its moments only, r x n);  s_j = ||N_j|| / ||R_j|| per channel j
    (a column of R and of G; a row for a right projection);  S = G diag(s), limited as
    S <- S gamma ||S_{t-1}|| / ||S|| when ||S|| > gamma ||S_{t-1}|| (``norm_growth_limit``
    gamma = 1.01);  W <- W (1 - lr wd) - scale * S (:mod:`lowmem_optim.update_forms`). The
    update is full-rank while the state is Adam's at rank r. Defaults are the paper's: scale
    (alpha) 1, a new projection every 200 steps, gamma 1.01; its pretraining runs follow
    GaLore's setup (rank a quarter of the hidden size). ``proj_method`` may name another
    projector for the paper's ablation (APOLLO with SVD). Low-rank gradient accumulation is
    refused (the update needs G).
    """

    registry_name = "apollo"
    part_choices = {
        "rule": ("adam",),
        "proj_method": ("random", "svd", "randomized_svd", "dct"),
        "update_form": ("channel",),
    }
    named_defaults = {"scale": 1.0, "update_proj_gap": 200, "norm_growth_limit": 1.01}


class APOLLOMini(AdamWFamily):
    """APOLLO-Mini (same paper): APOLLO's update with one factor for the whole tensor, from a
    rank-1 random subspace: SGD's memory (Adam moments of 1 x n).

    R = P^T G (P: m x 1, N(0, 1) entries, regenerated from a seed);  N = Adam(R);
    S = G ||N||_F / ||R||_F, limited by ``norm_growth_limit`` (1.01) as APOLLO's;
    W <- W (1 - lr wd) - scale * S, with the paper's scale alpha = sqrt(128) (apollo-torch's
    ``scale=128``, whose square root it applies) making up for the smaller norm ratio a rank-1
    estimate gives. The low-rank group's ``rank`` defaults to 1 when
    :func:`lowmem_optim.build_optimizer` (and so the training CLI) builds the groups
    (``lowrank_defaults``); groups given by hand name their ``rank``, as for every low-rank
    optimizer here.
    """

    registry_name = "apollo_mini"
    part_choices = {
        "rule": ("adam",),
        "proj_method": ("random", "svd", "randomized_svd", "dct"),
        "update_form": ("tensor",),
    }
    named_defaults = {"scale": math.sqrt(128), "update_proj_gap": 200, "norm_growth_limit": 1.01}
    lowrank_defaults = {"rank": 1}


class Fira(AdamWFamily):
    """Fira: GaLore's subspace plus the scaled rest of the gradient (Chen et al., 2024, arXiv 2410.01623).

    For a low-rank group, with P the subspace of any projector (SVD by default; randomized SVD,
    DCT, INT4/INT8 storage) refreshed every ``update_proj_gap`` steps, and channels j the columns
    of R for a left projection (its rows for a right one):

        R = P^T G;  N = Adam(R);  phi_j = ||N_j|| / ||R_j||  (0 where ||R_j|| = 0);
        S = phi ⊙ (G - P R);  if ||S_t|| > gamma ||S_{t-1}||: S_t <- S_t gamma ||S_{t-1}|| / ||S_t||;
        W <- W (1 - lr wd) - scale (P N + S).

    The residual G - P R, which GaLore discards, is trained too, each channel scaled as Adam
    scaled that channel in the subspace ("norm-based scaling"); the norm-growth limiter
    (``norm_growth_limit`` gamma = 1.01, the paper's) damps sudden growth of that term, measured
    without the step size (S / lr_t) so a learning-rate warm-up is not clipped. State: GaLore's
    (Adam's moments of R and the basis) plus one float32 number. ``scale`` 0.25 as in the
    paper's pre-training runs, where it multiplies P N and S alike here. The update form is
    :class:`lowmem_optim.update_forms.ResidualForm`; any optimizer of the Adam family takes it as
    ``update_form="residual"`` (e.g. DCT: ``DCTAdamW(update_form="residual", error_feedback=None)``).
    """

    registry_name = "fira"
    part_choices = {"rule": ("adam",), "update_form": ("residual",)}
    named_defaults = {"scale": 0.25, "norm_growth_limit": 1.01}


class GaLoreAdamW8bit(AdamWFamily):
    """GaLore with 8-bit AdamW in the subspace: Adam's moments stored blockwise-quantized
    (uint8 codes + one float32 absmax per 256 values, bitsandbytes' dynamic map). CPU and CUDA.
    """

    registry_name = "galore_adamw8bit"
    part_choices = {"rule": ("adam8bit",)}


class QGaLoreAdamW8bit(AdamWFamily):
    """Q-GaLore (Zhang et al., 2024, arXiv 2407.08296): GaLore with 8-bit AdamW in the subspace,
    projections stored in INT4 and refreshed lazily, layer by layer.

    For a low-rank group: P (top-r singular vectors of G) is stored as INT4 codes with a float32
    scale and zero per ``proj_group_size`` values (``proj_bits=4``;
    :mod:`lowmem_optim.projection.storage`) and dequantized on use; R = P^T G; N = Adam8bit(R)
    (:mod:`lowmem_optim.rules.adam8bit`); W <- W (1 - lr wd) - scale * P N. Refreshes follow
    :class:`~lowmem_optim.schedules.AdaptiveRefresh`: once the last ``queue_size`` |cos| of the
    leading singular vectors of consecutive projections average >= ``cos_threshold``, the layer's
    gap grows by ``gamma_proj`` (up to ``max_gap``). For the paper's memory figures pair it with
    INT8 weights (:func:`lowmem_optim.quant.int8_linear.quantize_linear_layers`: the update is
    then re-quantized by stochastic rounding in fp32) and layer-wise updates
    (:mod:`lowmem_optim.layerwise`).

    Param groups also accept q-galore-torch's keys: ``quant`` (False: no projection
    quantization), ``quant_n_bit`` (-> ``proj_bits``) and ``quant_group_size`` (->
    ``proj_group_size``); ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``,
    ``cos_threshold``, ``gamma_proj`` and ``queue_size`` have its names already.
    """

    registry_name = "q_galore_adamw8bit"
    part_choices = {"rule": ("adam8bit",)}
    named_defaults = {"refresh": "adaptive", "proj_bits": 4}
    #: q-galore-torch's group keys and ours
    QGALORE_KEYS: dict[str, str] = {"quant_n_bit": "proj_bits", "quant_group_size": "proj_group_size"}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        quant = group.pop("quant", None)
        for theirs, ours in self.QGALORE_KEYS.items():
            if theirs in group:
                value = group.pop(theirs)
                if ours in group and group[ours] != value:
                    raise ValueError(
                        f"Invalid param group: {theirs}={value!r} and {ours}={group[ours]!r} disagree "
                        f"(allowed: one of them, or equal values)"
                    )
                group[ours] = value
        if quant is not None:
            if not isinstance(quant, bool):
                raise ValueError(f"Invalid quant: {quant!r} (allowed: True, False)")
            if not quant:
                group["proj_bits"] = None
        super().add_param_group(group)


class GaLoreAdafactor(NamedOptimizer):
    """GaLore with HF transformers' Adafactor in the subspace (factored second moment,
    relative step size by default: ``lr=None``, ``relative_step=True``); the leading arguments
    are HF's ``Adafactor``'s."""

    registry_name = "galore_adafactor"
    part_choices = {"rule": ("adafactor",)}
    leading = (
        "lr",
        "eps",
        "clip_threshold",
        "decay_rate",
        "beta1",
        "weight_decay",
        "scale_parameter",
        "relative_step",
        "warmup_init",
    )


class NormalizedMomentumOptimizer(NamedOptimizer):
    """Base of AuON, HybridAuON, Muon, SinkGD and SCALE: weight matrices get a normalized rule,
    every other parameter an AdamW rule, in one optimizer (the ``rule`` key of each param group, as
    Muon implementations do with a ``use_muon`` flag).

    Keyword options shared by these classes: ``adamw_lr`` (1e-3), ``adamw_betas``
    ((0.9, 0.999)), ``adamw_eps`` (1e-8), ``adamw_weight_decay`` (1e-2) fill every group that
    names ``rule="adam"`` (a group's own keys win). Build the groups from a model with
    :func:`lowmem_optim.normalized_param_groups`. A matrix group with ``rank`` runs its rule
    inside a low-rank subspace (momentum r x n instead of m x n); ``scale`` is 1 here, since the
    rule already fixes the update's size.
    """

    named_defaults = {"scale": 1.0}
    leading = ("lr", "weight_decay", "momentum", "nesterov")

    def __init__(
        self,
        params: Iterable[Any],
        *args: Any,
        adamw_lr: float = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 1e-2,
        **hparams: Any,
    ) -> None:
        adamw = {"lr": adamw_lr, "betas": adamw_betas, "eps": adamw_eps, "weight_decay": adamw_weight_decay}
        adam = {hp.name: hp for hp in AdamRule.hparams}
        for key, value in adamw.items():
            adam[key].validate(value, f"adamw_{key}")
        self._adamw_defaults = {"rule": "adam", **adamw}
        super().__init__(params, *args, **hparams)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("rule", self.defaults["rule"]) == "adam":
            param_group = {**self._adamw_defaults, **param_group}
        super().add_param_group(param_group)


class AuON(NormalizedMomentumOptimizer):
    """AuON (Maity, arXiv 2509.24320) on weight matrices, AdamW on the other parameters.

    With Nesterov momentum D (beta = ``momentum``) of the gradient viewed as m x n:
    X = D / (||D||_F + 1e-7);  r = sqrt(mean(cosh(gamma X)^2));  U = X / (r + 1e-8);
    W <- W (1 - lr wd) - lr s U,  s = sqrt(max(1, m/n)) (``adjust_lr_fn``; ``"none"``: s = 1).
    Linear in the number of entries. Since r = 1 + O(1/(m n)), this is Frobenius-normalized
    Nesterov SGD in practice. ``normalize=False`` and ``gamma=1.5`` give the authors' later
    code (U = D / (r + 1e-8): the step then scales with the gradient).
    Defaults: lr 0.24 with gamma 1 as in the authors' training script (width 512); weight decay
    0 as in their optimizer class. The per-entry step is lr s / sqrt(m n), so the best lr grows
    with the matrix size. ``options``: see :class:`NormalizedMomentumOptimizer`.
    """

    registry_name = "auon"
    part_choices = {"rule": ("auon", "adam")}


class HybridAuON(NormalizedMomentumOptimizer):
    """Hybrid-AuON (same paper): ``ns_steps`` Newton-Schulz iterations (paper: 1) before AuON's
    cosh scaling:  Y = NS^k(X);  U = Y / (sqrt(mean(cosh(gamma Y)^2)) + 1e-8);  W <- W - lr s U.
    ``ns_steps=5`` is what the authors' later code runs (then U is Muon's update up to r).
    Newton-Schulz runs in ``ns_dtype`` (default: bfloat16 on CUDA, as the authors' code and
    torch.optim.Muon, float32 on other devices).
    The default lr is AuON's (the authors give none for Hybrid-AuON). One Newton-Schulz step
    scales small singular values by about a = 3.44, so ||U||_F is up to ~3.4 times AuON's (3.4
    for a Gaussian momentum; less when one direction dominates, since f(1) = 0.70).
    ``options``: see :class:`NormalizedMomentumOptimizer`.
    """

    registry_name = "hybrid_auon"
    part_choices = {"rule": ("hybrid_auon", "adam")}


class Muon(NormalizedMomentumOptimizer):
    """Muon (Jordan et al., 2024) on weight matrices, AdamW on the other parameters.

    U = 5 quintic Newton-Schulz iterations of X = D / (||D||_F + 1e-7) (bfloat16 on CUDA);
    W <- W (1 - lr wd) - lr s U. The matrix groups equal ``torch.optim.Muon`` with the same
    arguments (and ``ns_dtype="bfloat16"`` off CUDA); the defaults are torch's (lr 1e-3, weight
    decay 0.1; Keller Jordan's original uses lr 0.02 and no weight decay). Cost O(m n min(m, n))
    per step.
    ``options``: see :class:`NormalizedMomentumOptimizer`.
    """

    registry_name = "muon"
    part_choices = {"rule": ("muon", "adam")}


class SinkGD(NormalizedMomentumOptimizer):
    """SinkGD (Scetbon et al., arXiv 2502.06742) on weight matrices, AdamW on the other parameters.

    Stateless: with X_0 = G viewed as m x n and Q(X), R(X) the diagonals of its row and column
    l2 norms, ``sinkhorn_iterations`` = L (5) rounds of SR-Sinkhorn
    X <- sqrt(n) Q(X)^-1 X;  X <- sqrt(m) X R(X)^-1  give U = X_L, whose rows and columns
    approach unit RMS;  W <- W (1 - lr wd) - lr s U (``adjust_lr_fn``, default ``"none"``: s = 1).
    Cost O(L m n). Defaults: lr 1e-3 (U has unit RMS per entry, as Adam's update roughly does;
    tune it), no weight decay, as the paper's method has none. The embeddings and output head
    get AdamW here, as in the paper's benchmark setup (GaLore's). ``options``: see
    :class:`NormalizedMomentumOptimizer`; ``momentum`` and ``nesterov`` do not apply.
    """

    registry_name = "sinkgd"
    part_choices = {"rule": ("sinkhorn", "adam")}
    leading = ("lr", "weight_decay")


class SCALE(NormalizedMomentumOptimizer):
    """SCALE (Glentis et al., arXiv 2506.16659): channel-normalized SGD on weight matrices, AdamW
    on the other parameters.

    Each output channel (row i of the (out, in) weight; a column of the paper's d_in x d_out W)
    of G, or of M = beta M + (1 - beta) G when ``momentum`` = beta > 0, divided by its RMS:
    U_i = M_i / rms(M_i);  W <- W (1 - lr wd) - lr s U (s = 1 by default, ``adjust_lr_fn``).
    Defaults from the authors' scripts: lr 1e-3, no weight decay, and no momentum on the hidden
    matrices (stateless).

    Difference from the paper: SCALE normalizes the embedding and output head too and keeps
    momentum (beta 0.9) on the head alone; here, as for Muon, the embedding and head go to the
    AdamW rule (:func:`lowmem_optim.normalized_param_groups`), whose first moment (beta1 0.9)
    is that last-layer momentum, plus a second moment: the head costs 8 bytes per parameter
    instead of 4. The paper's exact form is a group of the head with
    ``rule="channel_normalized", momentum=0.9``. ``options``: see
    :class:`NormalizedMomentumOptimizer`; ``nesterov`` does not apply.
    """

    registry_name = "scale_sgd"
    part_choices = {"rule": ("channel_normalized", "adam")}
    leading = ("lr", "weight_decay", "momentum")
