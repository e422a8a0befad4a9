"""DCT projector: an SVD-free subspace of r fixed cosine vectors (Modoranu et al., arXiv 2505.17967).

With C the orthonormal DCT-II matrix of size d (the projected side),

    C[k, j] = sqrt(2/d) cos(pi k (2j + 1) / (2d)),   row 0 times sqrt(1/2),   Q = C^T,

a refresh computes the spectrum of G along the projected side, S = C G (left, d = m) or
S = G Q (right, d = n), scores each of the d rows / columns of S by its L1 norm (the paper's
default) or L2 norm, and keeps the top r indices I. Then R = S[I] is the low-rank gradient
(read from S, no second product) and an update N maps back as Q[:, I] N or N Q[:, I]^T.
The L2 score is the exact minimizer of the projection error over r-subsets of the basis, as
||G - Q_I Q_I^T G||_F^2 = ||G||_F^2 - sum_{i in I} ||S_i||^2.

``dct_type=3`` selects columns of C itself (Q = C, the DCT-III vectors
sqrt(2/d) w_j cos(pi j (2k + 1) / (2d)), w_0 = sqrt(1/2)): the basis of the authors' default
matmul path, while their FFT path and type 2 use C^T; both are orthonormal, they select
different vectors.

S comes from one product with the cached basis (O(m n d)), or, for type 2 and
d >= ``dct_fft_threshold``, from an FFT (Makhoul 1980, O(m n log d)): both give the same
scores. Only I is state (``proj_index``, int64), with the projected dimension ``proj_dim``, its
size ``proj_basis_size`` and ``proj_dct_type`` as numbers; the basis is a cache per (d, dtype,
device), shared by every layer, never state. With ``dct_keep_moments`` (default) a refresh tells
the rule where each kept index moved, so moments of indices that stay survive and new ones start
at zero: the authors' ``rotate_subspace``, whose rotation Q_{I_old}^T Q_{I_new} of a fixed
orthonormal basis is exactly this 0/1 selection; off, the moments are left as they are (the
authors' default). The similarity reported to the refresh
schedule is the index overlap |I_old & I_new| / r. ``proj_type`` "full" is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch

from lowmem_optim.parts import BOOLEAN, HParam, Part, SubspaceChange, integer, one_of
from lowmem_optim.projection.base import PROJ_TYPE, projection_sides
from lowmem_optim.sharding import RowShard

DCT_PROJ_TYPES = ("std", "reverse_std", "left", "right")
DCT_SCORES = ("l1", "l2")
DCT_TYPES = (2, 3)


@functools.lru_cache(maxsize=16)
def dct_basis(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Q = C^T (d x d): column k is the k-th orthonormal DCT-II vector. Built in float64."""
    k = torch.arange(d, dtype=torch.float64)[:, None]
    j = torch.arange(d, dtype=torch.float64)[None, :]
    c = math.sqrt(2.0 / d) * torch.cos(math.pi * k * (2 * j + 1) / (2 * d))
    c[0] *= math.sqrt(0.5)
    return c.T.contiguous().to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _makhoul_tables(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, mirror, twiddles) for a length-d DCT-II through a real FFT:
    v = x[order] = (x_0, x_2, x_4, ..., x_5, x_3, x_1); FFT(v)_k = conj(FFT(v)_{d-k}) is read
    from rfft's half at mirror[k]; X_k = Re(exp(-i pi k / (2d)) FFT(v)_k) times the norm."""
    k = torch.arange(d, dtype=torch.float64)
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2).flip(0)])
    upper = k > d // 2
    mirror = torch.where(upper, d - k, k).long()
    norm = torch.full((d,), math.sqrt(2.0 / d), dtype=torch.float64)
    norm[0] *= math.sqrt(0.5)
    theta = math.pi * k / (2 * d)
    twiddles = torch.stack([torch.cos(theta), torch.where(upper, -1.0, 1.0) * torch.sin(theta)], dim=-1) * norm[:, None]
    return order.to(device), mirror.to(device), twiddles.float().to(device)


def dct_fft(a: torch.Tensor, dim: int) -> torch.Tensor:
    """Orthonormal DCT-II of ``a`` along ``dim`` in float32, O(n log n) per vector (Makhoul 1980)."""
    x = a.float().movedim(dim, -1)
    order, mirror, twiddles = _makhoul_tables(x.shape[-1], x.device)
    half = torch.fft.rfft(x.index_select(-1, order), dim=-1)
    full = torch.view_as_real(half.index_select(-1, mirror))  # (..., d, 2): Re, Im of FFT(v)_k (conj above d/2)
    return (full * twiddles).sum(-1).movedim(-1, dim)


def projection_basis(d: int, dct_type: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The d x d basis whose columns are selected: Q = C^T (type 2: the DCT-II cosine vectors) or
    C (type 3: the DCT-III vectors, the authors' matmul path)."""
    q = dct_basis(d, dtype, device)
    return q if dct_type == 2 else q.T


#: values per pass of the FFT and of the scores: each vector is transformed (and scored) on its
#: own, so passes over a few vectors at a time bound their float32 temporaries (about 32 bytes per
#: value for the FFT) whatever the matrix's size, with the same values
SPECTRUM_CHUNK = 1 << 22


def vectors_per_pass(d: int) -> int:
    """How many length-``d`` vectors one pass of :func:`dct_spectrum` or :func:`scores` takes."""
    return max(1, SPECTRUM_CHUNK // d)


def _passes(vectors: int, d: int) -> Iterator[tuple[int, int]]:
    """(first vector, count) of each pass over ``vectors`` vectors of length ``d``."""
    step = vectors_per_pass(d)
    for start in range(0, vectors, step):
        yield start, min(step, vectors - start)


def dct_spectrum(a: torch.Tensor, dim: int, fft_threshold: int, dct_type: int = 2) -> torch.Tensor:
    """S = Q^T a (dim 0) or a Q (dim 1) for the type's basis Q: for type 2 the DCT-II of ``a``
    along ``dim`` (C a, a C^T), from an FFT from ``fft_threshold`` on (over
    :func:`vectors_per_pass` vectors at a time); for type 3 C^T a, a C."""
    d, other = a.shape[dim], 1 - dim
    if dct_type == 2 and d >= fft_threshold:
        if a.shape[other] <= vectors_per_pass(d):
            return dct_fft(a, dim).to(a.dtype)
        spectrum = torch.empty_like(a)
        for start, count in _passes(a.shape[other], d):
            spectrum.narrow(other, start, count).copy_(dct_fft(a.narrow(other, start, count), dim))
        return spectrum
    basis = projection_basis(d, dct_type, a.dtype, a.device)
    return basis.T @ a if dim == 0 else a @ basis


def scores(spectrum: torch.Tensor, dim: int, score: str) -> torch.Tensor:
    """The L1 norm (or squared L2 norm) of each row (dim 0) / column (dim 1) of the spectrum,
    float32, summed over :func:`vectors_per_pass` vectors at a time."""
    other = 1 - dim
    passes = _passes(spectrum.shape[other], spectrum.shape[dim])
    start, count = next(passes)
    total = _vector_scores(spectrum.narrow(other, start, count), other, score)
    for start, count in passes:  # each pass's temporaries freed before the next (the model counts one)
        total.add_(_vector_scores(spectrum.narrow(other, start, count), other, score))
    return total


def _vector_scores(part: torch.Tensor, other: int, score: str) -> torch.Tensor:
    s = part.float()
    return s.abs().sum(other) if score == "l1" else s.square().sum(other)


def top_indices(norms: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` largest scores' indices, ascending (int64)."""
    return torch.topk(norms, rank).indices.sort().values


def select_indices(spectrum: torch.Tensor, dim: int, rank: int, score: str) -> torch.Tensor:
    """The ``rank`` rows (dim 0) / columns (dim 1) of the spectrum with the largest L1 or L2
    norm, ascending (int64)."""
    return top_indices(scores(spectrum, dim, score), rank)


class DCTProjector(Part):
    """Top-r DCT-II columns of the gradient's spectrum; see the module docstring."""

    hparams = (
        dataclasses.replace(PROJ_TYPE, check=one_of(*DCT_PROJ_TYPES), doc=PROJ_TYPE.doc.removesuffix(", full (both)")),
        HParam("dct_score", "l1", one_of(*DCT_SCORES), "score of a DCT column: l1 (the paper's) or l2 (exact)"),
        HParam("dct_fft_threshold", 2048, integer(1), "DCT sizes from which the spectrum comes from an FFT"),
        HParam("dct_keep_moments", True, BOOLEAN, "move the moments of DCT indices that stay selected"),
        HParam(
            "dct_type",
            2,
            one_of(*DCT_TYPES),
            "basis: 2, the DCT-II cosine vectors (columns of C^T); 3, the columns of C (the authors' matmul path)",
        ),
    )
    #: the projector stores indices, not a matrix to quantize
    storage = None

    def __init__(self) -> None:
        # (gradient, R) of the last refresh: R is read from the spectrum, saving project's matmul
        self._refreshed: tuple[torch.Tensor, torch.Tensor] | None = None

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        return 8 * group["rank"]  # the int64 indices (the basis is a cache shared by every layer)

    def shared_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> dict[Any, int]:
        left, _ = projection_sides(shape, group["proj_type"])
        d = shape[0] if left else shape[1]
        return {("dct_basis", d, dtype): d * d * dtype.itemsize}  # the d x d basis cache

    def workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        left, _ = projection_sides(shape, group["proj_type"])
        return (shape[0] if left else shape[1]) * group["rank"] * dtype.itemsize  # Q[:, I], gathered on use

    def refresh_workspace_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
        """The spectrum S (m x n in ``dtype``) and, per pass of c values (:func:`vectors_per_pass`
        vectors), the scores' float32 copy of them (in a lower precision), |S| or S^2 and d
        partial scores, beside the d scores summed so far (from the second pass on); from an FFT,
        per pass, a float32 copy of G's vectors (in a lower precision), the half spectrum
        (complex64, d/2 + 1 per vector), the full one (complex64), its product with the twiddles
        (float32 pairs) and their sum (float32), beside S (allocated first when there are
        several passes; in one pass, S is the sum's cast, made after the rest is freed)."""
        left, _ = projection_sides(shape, group["proj_type"])
        d = shape[0] if left else shape[1]
        vectors = shape[0] * shape[1] // d
        step = min(vectors, vectors_per_pass(d))
        passes, chunk = -(-vectors // step), step * d
        spectrum = shape[0] * shape[1] * dtype.itemsize
        copy = 0 if dtype == torch.float32 else 4 * chunk
        scores = spectrum + copy + 4 * chunk + 4 * d + (4 * d if passes > 1 else 0)
        if group["dct_type"] != 2 or d < group["dct_fft_threshold"]:
            return scores
        fft = copy + 8 * step * (d // 2 + 1) + 8 * chunk + 8 * chunk + 4 * chunk + (spectrum if passes > 1 else 0)
        return max(scores, fft)

    def refresh(
        self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], seed: int, shard: RowShard | None = None
    ) -> SubspaceChange:
        left, _ = projection_sides((grad.shape[0] if shard is None else shard.rows, grad.shape[1]), group["proj_type"])
        dim = 0 if left else 1
        # sharded, the spectrum along the rows needs all of them (gathered); along the columns each
        # rank holds its rows of S = G Q, and a column's score is a sum over rows (all-reduced)
        gathered = shard is not None and dim == 0
        spectrum = dct_spectrum(
            shard.gather_rows(grad) if gathered else grad, dim, group["dct_fft_threshold"], group["dct_type"]
        )
        norms = scores(spectrum, dim, group["dct_score"])
        if shard is not None and not gathered:
            shard.all_reduce_(norms)
        if not torch.isfinite(norms).all():  # inf/NaN in the gradient reach every score they touch
            raise FloatingPointError(
                "DCTProjector: the gradient holds inf/NaN at a subspace refresh; no subspace can be chosen "
                "from it (use torch.amp.GradScaler, which skips such steps, or clip gradients)"
            )
        index = top_indices(norms, group["rank"])
        self._refreshed = (grad, spectrum.index_select(dim, index))
        size = spectrum.shape[dim]
        old = state.get("proj_index")
        state["proj_index"], state["proj_dim"], state["proj_basis_size"] = index, dim, size
        state["proj_dct_type"] = group["dct_type"]
        if old is None:
            return SubspaceChange()
        old_position = torch.full((size,), -1, dtype=torch.int64, device=index.device)
        old_position[old] = torch.arange(old.numel(), device=index.device)
        kept = old_position[index]
        overlap = float((kept >= 0).sum()) / index.numel()
        return SubspaceChange(similarity=overlap, kept=kept if group["dct_keep_moments"] else None)

    def _columns(self, state: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        """Q[:, I] (d x r) in ``like``'s dtype and device."""
        basis = projection_basis(state["proj_basis_size"], state.get("proj_dct_type", 2), like.dtype, like.device)
        return basis.index_select(1, state["proj_index"])

    def project(self, grad: torch.Tensor, state: dict[str, Any], shard: RowShard | None = None) -> torch.Tensor:
        refreshed, self._refreshed = self._refreshed, None
        if refreshed is not None and refreshed[0] is grad:
            return refreshed[1]
        q = self._columns(state, grad)
        if state["proj_dim"] == 1:
            return grad @ q
        if shard is None:
            return q.T @ grad
        return shard.all_reduce_(q[shard.start : shard.stop].T @ grad)  # Q_I^T G = sum over ranks

    def back_project(self, low: torch.Tensor, state: dict[str, Any], shard: RowShard | None = None) -> torch.Tensor:
        q = self._columns(state, low)
        if state["proj_dim"] == 1:
            return low @ q.T
        return (q if shard is None else q[shard.start : shard.stop]) @ low
