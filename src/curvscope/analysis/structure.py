"""Outliers, bulk edges and negative mass of an SLQ density, by the rule of docs/structure.md.

:func:`spectrum_structure` works on the stored quadrature of a
:class:`~curvscope.linalg.SpectralDensity` (no operator products) and returns a small
:class:`SpectrumStructure` that saves and loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..linalg.density import SpectralDensity
from ..results import ResultFile, save_result
from .smoothing import papyan_map, papyan_sigma

_ARRAYS = (
    "outliers",
    "outliers_mass",
    "outliers_support",
    "outliers_low",
    "outliers_low_mass",
    "outliers_low_support",
)


@dataclass(frozen=True)
class SpectrumStructure:
    """What a spectral density says beyond its picture (see :func:`spectrum_structure`).

    All eigenvalue-valued fields are in the operator's natural units.

    Attributes:
        lambda_min, lambda_max: Extreme Ritz values over all probes (Ritz values lie inside
            the spectrum: lambda_min is an upper bound of the true minimum, lambda_max a lower
            bound of the true maximum; both converge first in Lanczos).
        abs_min_over_max: |lambda_min| / lambda_max (NaN when lambda_max <= 0).
        bulk_min, bulk_max: Edges of the bulk: the extreme Ritz values not beyond a
            separating gap.
        outliers: Isolated eigenvalues above the bulk, descending, shape (k,).
        outliers_mass: Their quadrature mass (about multiplicity / n), shape (k,).
        outliers_support: Share of probes with a Ritz value at each, shape (k,).
        outliers_low: Isolated eigenvalues below the bulk, ascending, shape (k_low,).
        outliers_low_mass, outliers_low_support: As above, shape (k_low,).
        negative_mass: Quadrature mass on nodes < 0: the estimated share of eigenvalues below
            zero.
        negative_mass_band: Quadrature mass on nodes < -band: the negative mass the
            quadrature can resolve. A large near-null space (common in networks) is a point
            mass at 0 that Lanczos represents by nodes a resolution's width to either side of
            0, so ``negative_mass`` swings with the probes while this stays put
            (docs/structure.md, "The outlier rule").
        band: The band in natural units (see ``band_rtol`` of :func:`spectrum_structure`).
        num_unresolved: Ritz values beyond a bulk edge that belong to no cluster present in
            enough probes (an unconverged Ritz value in a gap, or a smooth tail seen by too few
            Lanczos steps); they are neither bulk nor outliers.
        unresolved_mass: Their quadrature mass.
        n: Dimension of the operator.
        num_probes: Probes of the density.
        params: The rule's parameters (gap_factor, cluster_rtol, min_support,
            max_outlier_mass, band_rtol; band_rtol None when the band is the resolution).
    """

    lambda_min: float
    lambda_max: float
    abs_min_over_max: float
    bulk_min: float
    bulk_max: float
    outliers: np.ndarray
    outliers_mass: np.ndarray
    outliers_support: np.ndarray
    outliers_low: np.ndarray
    outliers_low_mass: np.ndarray
    outliers_low_support: np.ndarray
    negative_mass: float
    negative_mass_band: float
    band: float
    num_unresolved: int
    unresolved_mass: float
    n: int
    num_probes: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_outliers(self) -> int:
        """Number of isolated eigenvalues above the bulk."""
        return int(self.outliers.size)

    @property
    def num_outliers_low(self) -> int:
        """Number of isolated eigenvalues below the bulk."""
        return int(self.outliers_low.size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists for arrays); inverse :meth:`from_dict`."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, dict):
                value = dict(value)
            out[name] = value
        out["num_outliers"] = self.num_outliers
        out["num_outliers_low"] = self.num_outliers_low
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectrumStructure:
        """Inverse of :meth:`to_dict` (extra keys such as ``num_outliers`` are ignored)."""
        kwargs = {name: data[name] for name in cls.__dataclass_fields__}
        for name in _ARRAYS:
            kwargs[name] = np.asarray(kwargs[name], dtype=np.float64)
        for name in ("n", "num_probes", "num_unresolved"):
            kwargs[name] = int(kwargs[name])
        kwargs["params"] = dict(kwargs["params"])
        return cls(**kwargs)

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``path.npz`` (the outlier arrays) and ``path.json`` (everything else).

        The ``.json`` also lists the outlier arrays as ``summary`` (``load`` reads them from
        the ``.npz``).
        """
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        meta = {k: v for k, v in self.to_dict().items() if k not in _ARRAYS}
        summary = {name: getattr(self, name).tolist() for name in _ARRAYS}
        return save_result(path, arrays, {**meta, "summary": summary, "kind": "SpectrumStructure"})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SpectrumStructure:
        """Read a structure written by :meth:`save`; round-trips exactly.

        Raises:
            FileNotFoundError: A file is missing.
            ValueError: A file is damaged or inconsistent (naming the file and the field):
                an outlier array not 1-D or not of its group's length, masses or supports
                negative, a count not a non-negative integer, n or num_probes not positive,
                a number field not a number, params not an object.
        """
        file = ResultFile(path, "SpectrumStructure", "SpectrumStructure.save")
        kwargs: dict[str, Any] = {}
        for group in ("outliers", "outliers_low"):
            values = file.array(group, shape=(None,), nan=False)
            kwargs[group] = values
            for suffix in ("_mass", "_support"):
                kwargs[group + suffix] = file.array(
                    group + suffix, shape=values.shape, like=f"as {group}", minimum=0.0
                )
            count = "num_" + group
            if count in file.meta and file.meta[count] != values.size:
                raise ValueError(
                    f"{file.json_path}: field {count!r} is {file.meta[count]!r} but "
                    f"{file.npz_path.name} holds {values.size} {group}"
                )
        for name in _ARRAYS:
            kwargs[name] = np.asarray(kwargs[name], dtype=np.float64)
        for name in ("n", "num_probes"):
            kwargs[name] = file.integer(name, minimum=1)
        kwargs["num_unresolved"] = file.integer("num_unresolved", minimum=0)
        for name in ("negative_mass", "negative_mass_band", "unresolved_mass", "band"):
            kwargs[name] = file.number(name, minimum=0.0)
        for name in ("lambda_min", "lambda_max", "abs_min_over_max", "bulk_min", "bulk_max"):
            kwargs[name] = file.number(name)
        kwargs["params"] = dict(file.mapping("params"))
        return cls(**kwargs)

    def summary(self) -> str:
        """A few lines for a terminal."""

        def fmt(values: np.ndarray) -> str:
            return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"

        lines = [
            f"lambda_min {self.lambda_min:.6g}  lambda_max {self.lambda_max:.6g}  "
            f"|lambda_min|/lambda_max {self.abs_min_over_max:.4g}",
            f"bulk [{self.bulk_min:.6g}, {self.bulk_max:.6g}]  "
            f"negative mass {self.negative_mass_band:.4g} below -{self.band:.3g} "
            f"({self.negative_mass:.4g} below 0)",
            f"outliers above the bulk: {self.num_outliers} {fmt(self.outliers)}",
            f"outliers below the bulk: {self.num_outliers_low} {fmt(self.outliers_low)}",
        ]
        if self.num_unresolved:
            lines.append(
                f"unresolved Ritz values beyond the bulk: {self.num_unresolved} "
                f"(mass {self.unresolved_mass:.3g}): more Lanczos steps would settle them"
            )
        return "\n".join(lines)


@dataclass
class _Clusters:
    """Pooled Ritz values merged into clusters, ascending."""

    lo: np.ndarray  # smallest member, (K,)
    hi: np.ndarray  # largest member, (K,)
    value: np.ndarray  # median member, (K,)
    mass: np.ndarray  # quadrature mass (1/P) sum of member weights, (K,)
    support: np.ndarray  # share of probes with a member, (K,)
    size: np.ndarray  # number of members, (K,)


def _cluster(d: SpectralDensity, tol: float) -> _Clusters:
    """Merge pooled Ritz values whose consecutive distance is <= tol (single linkage)."""
    finite = np.isfinite(d.nodes)
    probe_ids = np.broadcast_to(np.arange(d.num_probes)[:, None], d.nodes.shape)[finite]
    nodes = d.nodes[finite]
    weights = d.weights[finite] / d.num_probes
    order = np.argsort(nodes, kind="stable")
    nodes, weights, probe_ids = nodes[order], weights[order], probe_ids[order]
    starts = np.r_[0, np.flatnonzero(np.diff(nodes) > tol) + 1]
    ends = np.r_[starts[1:], nodes.size]
    count = starts.size
    lo, hi, value = nodes[starts], nodes[ends - 1], np.empty(count)
    mass, support = np.empty(count), np.empty(count)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        value[i] = float(np.median(nodes[s:e]))
        mass[i] = float(np.sum(weights[s:e]))
        support[i] = np.unique(probe_ids[s:e]).size / d.num_probes
    return _Clusters(lo, hi, value, mass, support, ends - starts)


def _bulk_edges(c: _Clusters, gap_factor: float, max_mass: float) -> tuple[int, int]:
    """Indices (a, b) of the bulk's first and last cluster; see :func:`spectrum_structure`.

    A pair (a, b) is *valid* when each edge that is not the spectrum's end has at most
    ``max_mass`` beyond it and a gap beyond it wider than gap_factor * (hi[b] - lo[a]). If
    (a, b) and (a', b') are valid, so is (max(a, a'), min(b, b')): the narrower bulk only
    lowers the bar, and the mass caps keep max(a, a') <= min(b, b'). So the narrowest valid
    pair is unique; it is found by trying every pair of candidate edges.
    """
    count = c.lo.size
    if count == 1:
        return 0, 0
    gaps = c.lo[1:] - c.hi[:-1]  # gaps[i]: between clusters i and i + 1
    mass_above = np.r_[np.cumsum(c.mass[::-1])[::-1][1:], 0.0]  # mass of clusters > i
    mass_below = np.r_[0.0, np.cumsum(c.mass)[:-1]]  # mass of clusters < i
    lows = np.r_[0, np.flatnonzero(mass_below[1:] <= max_mass) + 1]
    highs = np.r_[np.flatnonzero(mass_above[:-1] <= max_mass), count - 1]
    gap_below = gaps[np.maximum(lows - 1, 0)]
    gap_above = gaps[np.minimum(highs, count - 2)]
    best_a, best_b = 0, count - 1
    for start in range(0, lows.size, 256):  # rows in chunks: memory 256 x len(highs)
        rows = slice(start, start + 256)
        width = c.hi[highs][None, :] - c.lo[lows[rows]][:, None]
        valid = (
            ((lows[rows] == 0)[:, None] | (gap_below[rows][:, None] > gap_factor * width))
            & ((highs == count - 1)[None, :] | (gap_above[None, :] > gap_factor * width))
            & (lows[rows][:, None] <= highs[None, :])
        )
        if np.any(valid):
            best_a = max(best_a, int(lows[rows][np.any(valid, axis=1)].max()))
            best_b = min(best_b, int(highs[np.any(valid, axis=0)].min()))
    return best_a, best_b


def default_cluster_rtol(d: SpectralDensity) -> float:
    """Default ``cluster_rtol``: 1e-6 for float64 operator products, 1e-4 otherwise.

    Ritz values of an isolated eigenvalue agree across probes to about the products' accuracy times
    ||A||.
    """
    dtype = str(d.meta.get("operator_dtype", "float64"))
    return 1e-6 if dtype == "float64" else 1e-4


def spectrum_structure(
    d: SpectralDensity,
    gap_factor: float = 0.25,
    max_outlier_mass: float = 0.1,
    min_support: float = 0.5,
    cluster_rtol: float | None = None,
    band_rtol: float | None = None,
) -> SpectrumStructure:
    """Outliers, bulk edges and negative mass of an SLQ density.

    The rule works on the pooled Ritz values of all probes (docs/structure.md, "The outlier
    rule", gives the reasons for each step and its tests over planted spectra):

    1. **Clusters.** Pooled Ritz values, sorted, are merged while consecutive values are within
       ``cluster_rtol * max|lambda|`` (single linkage). A cluster's *support* is the share of
       probes with a member in it; an isolated eigenvalue forms one cluster in every probe.
    2. **Bulk edges.** With clusters ascending, a candidate bulk is a run of clusters a..b. Its
       upper edge b is *separated* when the gap from b to the next cluster up exceeds
       ``gap_factor`` times the bulk width hi[b] - lo[a] and at most ``max_outlier_mass`` of
       the quadrature mass lies above b; the lower edge a likewise, mirrored. A candidate is
       valid when each edge is separated or the end of the spectrum. The bulk is the narrowest
       valid candidate (largest a, smallest b), which is unique.
    3. **Outliers.** Clusters above b (below a) with support >= ``min_support`` are the high
       (low) outliers, reported at the median of their Ritz values; the others are counted as
       unresolved.

    A zero-width bulk (a point mass) makes any gap count. Multiplicities are not resolved;
    ``outliers_mass * n`` estimates them, noisily. The count depends on the number of Lanczos
    steps while part of a long tail is unconverged (``num_unresolved > 0`` flags that): compare
    counts only at equal (steps, probes).

    Args:
        d: The SLQ result (P probes, m nodes each).
        gap_factor: Separating gap as a multiple of the bulk width.
        max_outlier_mass: Largest quadrature mass allowed beyond each edge (the share of
            eigenvalues that may be outliers on one side), in (0, 0.5).
        min_support: Share of probes that must have a Ritz value in an outlier's cluster.
        cluster_rtol: Ritz values within cluster_rtol * max|lambda| are one cluster;
            default :func:`default_cluster_rtol` (1e-6 for float64 products, 1e-4 otherwise).
        band_rtol: ``negative_mass_band`` counts nodes below -band_rtol * max|lambda|;
            default (None): below minus the quadrature's resolution, Papyan's kernel width
            in natural units h * 2 / (M - 1) / sqrt(8 ln 3) (:func:`papyan_map`,
            :func:`papyan_sigma`; about 0.37 * (lambda_max - lambda_min) / (M - 1)), or
            1e-3 * max|lambda| when M < 2.

    Returns:
        :class:`SpectrumStructure`.

    Example:
        A bulk of 50 eigenvalues in [0, 1] and one at 10:

        >>> import numpy as np
        >>> from curvscope import spectral_density
        >>> from curvscope.analysis import spectrum_structure
        >>> values = np.r_[np.linspace(0.0, 1.0, 50), 10.0]
        >>> s = spectrum_structure(spectral_density(np.diag(values), num_iters=20, num_probes=3))
        >>> s.num_outliers, s.outliers.round(6).tolist(), round(s.bulk_max, 2)
        (1, [10.0], 1.0)
    """
    if gap_factor <= 0:
        raise ValueError(f"gap_factor must be positive, got {gap_factor}")
    if not 0 < max_outlier_mass < 0.5:
        raise ValueError(
            f"max_outlier_mass must lie in (0, 0.5): outliers are the minority beyond each "
            f"edge, got {max_outlier_mass}"
        )
    if not 0 < min_support <= 1:
        raise ValueError(f"min_support must lie in (0, 1], got {min_support}")
    nodes, weights = d.flat()
    if nodes.size == 0:
        raise ValueError("the density has no finite Ritz values: was the SLQ run empty?")
    rtol = default_cluster_rtol(d) if cluster_rtol is None else float(cluster_rtol)
    lam_min, lam_max = float(nodes.min()), float(nodes.max())
    scale = max(abs(lam_min), abs(lam_max))
    c = _cluster(d, rtol * scale)
    a, b = _bulk_edges(c, gap_factor, max_outlier_mass)
    supported = c.support >= min_support - 1e-12
    high = np.arange(b + 1, c.lo.size)[::-1]
    low = np.arange(0, a)
    high_out, low_out = high[supported[high]], low[supported[low]]
    unresolved = np.r_[high[~supported[high]], low[~supported[low]]].astype(int)
    if band_rtol is not None:
        band = float(band_rtol) * scale
    elif int(np.max(d.num_steps)) >= 2:
        band = papyan_map(d)[1] * papyan_sigma(int(np.max(d.num_steps)))
    else:
        band = 1e-3 * scale
    params = {
        "gap_factor": float(gap_factor),
        "max_outlier_mass": float(max_outlier_mass),
        "min_support": float(min_support),
        "cluster_rtol": rtol,
        "band_rtol": None if band_rtol is None else float(band_rtol),
    }
    return SpectrumStructure(
        lambda_min=lam_min,
        lambda_max=lam_max,
        abs_min_over_max=abs(lam_min) / lam_max if lam_max > 0 else float("nan"),
        bulk_min=float(c.lo[a]),
        bulk_max=float(c.hi[b]),
        outliers=c.value[high_out],
        outliers_mass=c.mass[high_out],
        outliers_support=c.support[high_out],
        outliers_low=c.value[low_out],
        outliers_low_mass=c.mass[low_out],
        outliers_low_support=c.support[low_out],
        negative_mass=float(np.sum(weights[nodes < 0])),
        negative_mass_band=float(np.sum(weights[nodes < -band])),
        band=float(band),
        num_unresolved=int(np.sum(c.size[unresolved])),
        unresolved_mass=float(np.sum(c.mass[unresolved])),
        n=int(d.n),
        num_probes=d.num_probes,
        params=params,
    )
