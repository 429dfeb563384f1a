"""Per-block (per-layer) spectra: one SLQ density per parameter group.

The block of a group is the diagonal block of the full Hessian on that group's parameters,
H_gg = d^2 L / d theta_g^2 with every other parameter held fixed; it is what
``HessianOperator(params=group)`` applies. Zhang et al. 2024 ("Why Transformers need Adam: a
Hessian perspective") compare such block spectra across architectures.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..linalg import SpectralDensity, spectral_density
from ..operators import HessianOperator
from ..results import environment_metadata
from .structure import SpectrumStructure, spectrum_structure

ROOT_GROUP = "(root)"


def default_groups(model: nn.Module) -> dict[str, list[str]]:
    """One group per module that directly owns trainable parameters.

    The group is named by the module's path in ``model.named_modules()`` ("0", "2",
    "features.conv1"; parameters of the model itself go to "(root)") and holds the full names
    of the parameters that module owns directly, in ``model.named_parameters()`` order. A
    parameter shared by several modules belongs to the first that owns it.

    Returns:
        {group name: [parameter names]} in model order.
    """
    named = dict(model.named_parameters())
    groups: dict[str, list[str]] = {}
    taken: set[str] = set()
    for path, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            full = f"{path}.{local}" if path else local
            if full not in named or full in taken or not param.requires_grad:
                continue
            groups.setdefault(path or ROOT_GROUP, []).append(full)
            taken.add(full)
    order = {name: i for i, name in enumerate(named)}
    return {
        name: sorted(params, key=order.__getitem__)
        for name, params in sorted(groups.items(), key=lambda item: min(order[p] for p in item[1]))
    }


def resolve_groups(
    model: nn.Module, groups: Mapping[str, Sequence[str] | str] | None
) -> dict[str, list[str]]:
    """Check a user grouping and expand module paths to their parameters.

    Args:
        model: The model.
        groups: {group name: [names]}; a name is a parameter name ("0.weight") or a module
            path ("features", every trainable parameter under it). None: :func:`default_groups`.

    Returns:
        {group name: [parameter names in model order]}.
    """
    if groups is None:
        resolved = default_groups(model)
        if not resolved:
            raise ValueError("the model has no trainable parameters to group")
        return resolved
    if not isinstance(groups, Mapping) or not groups:
        raise TypeError("groups must be a non-empty dict {group name: [parameter names]}")
    named = dict(model.named_parameters())
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(named)}
    resolved = {}
    for group, items in groups.items():
        if isinstance(items, str):
            items = [items]
        names: list[str] = []
        for item in items:
            if item in named:
                names.append(item)
            elif item in modules:
                prefix = f"{item}." if item else ""
                names.extend(
                    n for n, p in named.items() if n.startswith(prefix) and p.requires_grad
                )
            else:
                close = [n for n in named if item in n][:5]
                hint = f" (did you mean {close}?)" if close else ""
                raise ValueError(
                    f"group {group!r}: {item!r} is neither a parameter nor a module of the "
                    f"model{hint}"
                )
        unique = sorted(set(names), key=order.__getitem__)
        if not unique:
            raise ValueError(f"group {group!r} holds no trainable parameter")
        resolved[str(group)] = unique
    return resolved


@dataclass(frozen=True)
class BlockSpectra:
    """A table of per-group spectral densities.

    Attributes:
        groups: {group name: [parameter names]} in table order.
        densities: {group name: SpectralDensity} of the group's diagonal Hessian block.
        structures: {group name: SpectrumStructure} of each density.
        meta: Operator class, iterations, probes, seed, versions, wall time.
    """

    groups: dict[str, list[str]]
    densities: dict[str, SpectralDensity]
    structures: dict[str, SpectrumStructure]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Group names, in the order of the densities."""
        return list(self.groups)

    def __getitem__(self, name: str) -> SpectralDensity:
        return self.densities[name]

    def __len__(self) -> int:
        return len(self.groups)

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per group, the columns of :meth:`table`.

        Keys: group, n, num_tensors, lambda_min, lambda_max, bulk_max, abs_min_over_max,
        negative_mass, negative_mass_band, num_outliers, num_outliers_low (see
        :class:`~curvscope.analysis.structure.SpectrumStructure`).
        """
        rows = []
        for name in self.groups:
            s = self.structures[name]
            rows.append(
                {
                    "group": name,
                    "n": s.n,
                    "num_tensors": len(self.groups[name]),
                    "lambda_min": s.lambda_min,
                    "lambda_max": s.lambda_max,
                    "bulk_max": s.bulk_max,
                    "abs_min_over_max": s.abs_min_over_max,
                    "negative_mass": s.negative_mass,
                    "negative_mass_band": s.negative_mass_band,
                    "num_outliers": s.num_outliers,
                    "num_outliers_low": s.num_outliers_low,
                }
            )
        return rows

    def table(self) -> str:
        """The rows as an aligned text table (for a terminal).

        "neg. mass" is the resolved negative mass (``negative_mass_band``): the strict one counts
        round-off nodes of a null space, which rank-deficient blocks have.
        """
        head = ("group", "n", "lambda_min", "lambda_max", "neg. mass", "outliers")
        lines = [
            (
                r["group"],
                str(r["n"]),
                f"{r['lambda_min']:.4g}",
                f"{r['lambda_max']:.4g}",
                f"{r['negative_mass_band']:.3f}",
                f"{r['num_outliers']}+{r['num_outliers_low']}",
            )
            for r in self.to_rows()
        ]
        widths = [max(len(c) for c in col) for col in zip(head, *lines, strict=True)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in [head, *lines]
        )

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write each density and structure and ``index.json`` into ``directory``.

        Files ``<i>_<name>.npz/.json`` (the density) and ``<i>_<name>.structure.npz/.json``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for i, name in enumerate(self.groups):
            stem = f"{i:03d}_{_safe(name)}"
            self.densities[name].save(directory / stem)
            self.structures[name].save(directory / f"{stem}.structure")
            entries.append({"name": name, "stem": stem, "params": self.groups[name]})
        index = {"kind": "BlockSpectra", "groups": entries, "meta": self.meta}
        path = directory / "index.json"
        tmp = directory / ".index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> BlockSpectra:
        """Read a table written by :meth:`save`.

        Raises:
            FileNotFoundError: ``index.json`` or a group's file is missing.
            ValueError: ``index.json`` is damaged or inconsistent (naming the entry and the
                field: groups not a list, a name not a string or repeated, a stem not a plain
                file stem inside ``directory``, params not a list of strings), or a group's
                density or structure file is (see their ``load``).
        """
        directory = Path(directory)
        path = directory / "index.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: was a BlockSpectra saved there?")
        index = _read_index(path)
        groups, densities, structures = {}, {}, {}
        for entry in index["groups"]:
            name, stem = entry["name"], entry["stem"]
            groups[name] = list(entry["params"])
            densities[name] = SpectralDensity.load(directory / stem)
            structures[name] = SpectrumStructure.load(directory / f"{stem}.structure")
        return cls(groups, densities, structures, index.get("meta", {}))


_STEM = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _read_index(path: Path) -> dict[str, Any]:
    """``index.json`` of a :class:`BlockSpectra`, checked: ValueError naming the entry and field."""
    try:
        index = json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: not valid JSON ({type(error).__name__}: {error})") from error
    if not isinstance(index, dict):
        raise ValueError(f"{path}: must hold a JSON object, got a {type(index).__name__}")
    if index.get("kind", "BlockSpectra") != "BlockSpectra":
        raise ValueError(
            f"{path}: field 'kind' is {index['kind']!r}, not 'BlockSpectra': not a table "
            "written by BlockSpectra.save"
        )
    if not isinstance(index.get("groups"), list):
        raise ValueError(
            f"{path}: field 'groups' must be a list of group entries, got "
            f"{index.get('groups', 'nothing')!r}"
        )
    if not isinstance(index.get("meta", {}), dict):
        raise ValueError(f"{path}: field 'meta' must be a JSON object, got {index['meta']!r}")
    names: set[str] = set()
    for i, entry in enumerate(index["groups"]):
        where = f"{path}: groups[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object with name, stem and params")
        name, stem, params = entry.get("name"), entry.get("stem"), entry.get("params")
        if not isinstance(name, str) or name in names:
            what = "repeated" if name in names else "not a string"
            raise ValueError(f"{where} field 'name' is {what}: {name!r}")
        names.add(name)
        if not isinstance(stem, str) or not _STEM.match(stem):
            raise ValueError(
                f"{where} field 'stem' must be a file stem inside the folder (letters, digits, "
                f"_ . -; as save writes), got {stem!r}"
            )
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise ValueError(
                f"{where} field 'params' must be a list of parameter names, got {params!r}"
            )
    return index


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "group"


def block_spectra(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Any],
    data: Iterable[Any],
    groups: Mapping[str, Sequence[str] | str] | None = None,
    num_iters: int = 90,
    num_probes: int = 10,
    seed: int = 0,
    operator_cls: type = HessianOperator,
    structure_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    **op_kwargs: Any,
) -> BlockSpectra:
    """SLQ densities of the diagonal curvature blocks of every layer (or of a user grouping).

    For each group g, ``operator_cls(model, loss_fn, data, params=g, **op_kwargs)`` is the
    block of the curvature on g's parameters with all others fixed (the diagonal block
    H_gg of the full Hessian for :class:`~curvscope.operators.HessianOperator`), and
    :func:`~curvscope.linalg.spectral_density` estimates its density with ``num_iters`` steps
    (capped at the block's size, where Lanczos becomes exact) and ``num_probes`` probes.

    Args:
        model: The model (never modified).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's mean loss.
        data: Re-iterable of batches.
        groups: {group name: [parameter names or module paths]}; default one group per
            module that directly owns parameters (:func:`default_groups`).
        num_iters: Lanczos steps per probe.
        num_probes: Probes per group.
        seed: Seed of every group's start vectors.
        operator_cls: Operator class taking ``params=`` (HessianOperator, GGNOperator, ...).
        structure_kwargs: Arguments of :func:`~curvscope.analysis.structure.spectrum_structure`.
        progress: Show Lanczos progress bars.
        **op_kwargs: Further operator arguments (dtype, device, unpack_batch, ...).

    Returns:
        :class:`BlockSpectra` with one density and structure per group, in model order.
    """
    if "params" in op_kwargs:
        raise TypeError("pass the parameter subsets as groups={name: [parameter names]}")
    resolved = resolve_groups(model, groups)
    started = time.perf_counter()
    densities, structures = {}, {}
    for name, params in resolved.items():
        op = operator_cls(model, loss_fn, data, params=params, **op_kwargs)
        density = spectral_density(
            op, num_iters=num_iters, num_probes=num_probes, seed=seed, progress=progress
        )
        densities[name] = SpectralDensity(
            density.nodes,
            density.weights,
            density.num_steps,
            density.n,
            {**density.meta, "group": name, "params": list(params), "num_samples": op.num_samples},
        )
        structures[name] = spectrum_structure(densities[name], **dict(structure_kwargs or {}))
    meta = {
        **environment_metadata(),
        "operator": getattr(operator_cls, "__name__", str(operator_cls)),
        "num_iters": num_iters,
        "num_probes": num_probes,
        "seed": seed,
        "structure_kwargs": dict(structure_kwargs or {}),
        "wall_time_s": time.perf_counter() - started,
    }
    return BlockSpectra(resolved, densities, structures, meta)
