"""Sections of a results folder: what the commands write into their ``--out``.

That is, what ``curvscope density``, ``top``, ``trace``, ``overlap``, ``decompose`` and
``blocks`` write, read back with the result classes' own ``load`` (which check every field and
name the file of a damaged one).

A folder is read by the ``kind`` of each ``.json`` beside its ``.npz``:

- ``SpectralDensity``: a density section (figure, structure, and the eigenvalues of
  ``top_eigenpairs`` from ``density --mark-top`` and the structure of ``density --structure``
  when present);
- ``Eigenpairs``: a table of eigenvalues with residuals;
- ``Trace``: the estimate with its standard error;
- ``GradientOverlap``: the shares of the gradient in the top eigenspace;
- ``Decomposition`` (``decompose.json``): every term's density and structure;
- ``index.json`` of kind ``BlockSpectra`` (``blocks``' ``blocks/`` folder): per-block spectra.

Any other file is listed as not shown.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import BlockSpectra, GradientOverlap, SpectrumStructure, spectrum_structure
from ..linalg import Eigenpairs, SpectralDensity, TraceEstimate
from ..plot import TERM_LABELS, plot_densities, plot_density, plot_overlap
from ..results import load_result
from .facts import facts
from .page import Image, Section, Table, figure_png, number, numbers
from .tables import eigenpairs_table, structure_table, structures_table, trace_table

#: Gap factor of a structure the report computes itself (that of ``curvscope density``).
GAP_FACTOR = 0.25

#: Operator class -> (what it is called, its letter).
OPERATORS = {
    "HessianOperator": ("Hessian", "H"),
    "GGNOperator": ("Gauss-Newton matrix", "G"),
    "ResidualOperator": ("residual H - G", "R"),
    "FisherOperator": ("Fisher", "F"),
    "EmpiricalFisherOperator": ("empirical Fisher", "F_emp"),
}

#: Kinds whose files make a section of their own, in page order.
ORDER = ("SpectralDensity", "Eigenpairs", "Trace", "GradientOverlap", "Decomposition")
#: Section kinds (:attr:`~.page.Section.kind`) by result kind.
SECTION_KINDS = {
    "SpectralDensity": "density",
    "Eigenpairs": "eigenpairs",
    "Trace": "trace",
    "GradientOverlap": "overlap",
    "Decomposition": "decompose",
    "BlockSpectra": "blocks",
    "SpectrumStructure": "structure",
}
#: Order of the folders on a page of several: by the last kind of their sections here.
PAGE_ORDER = (*SECTION_KINDS.values(), "run")


def operator_words(meta: dict[str, Any]) -> tuple[str, str]:
    """(name, letter) of the operator a result's metadata names; ("operator", "A") if none."""
    return OPERATORS.get(str(meta.get("operator", "")), ("operator", "A"))


def capitalized(text: str) -> str:
    """``text`` with its first letter upper-case and the rest as it is ("Gauss-Newton")."""
    return text[:1].upper() + text[1:]


def draw(make: Callable[[], Any], alt: str, caption: str, dpi: int, notes: list[str]) -> list:
    """``[Image]`` of the figure ``make()`` returns, or ``[]`` and a note when it cannot."""
    try:
        figure = make()
    except ValueError as error:
        notes.append(f"figure not drawn ({alt}): {error}")
        return []
    return [Image(figure_png(figure, dpi), alt, caption)]


def read_kind(path: Path) -> str | None:
    """The ``kind`` field of a result's ``.json`` (None when it has none).

    Raises:
        ValueError: The file is not a JSON object (damaged); the message names it.
    """
    try:
        meta = json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(
            f"{path}: not valid JSON ({type(error).__name__}: {error}): the result is damaged; "
            "rerun the command that wrote it"
        ) from error
    if not isinstance(meta, dict):
        raise ValueError(
            f"{path}: must hold a JSON object of metadata, got a {type(meta).__name__}: the "
            "result is damaged; rerun the command that wrote it"
        )
    kind = meta.get("kind")
    return kind if isinstance(kind, str) else None


def folder_sections(folder: Path, root: Path, dpi: int = 100) -> tuple[list[Section], list[str]]:
    """The sections of the results directly in ``folder``, and the files not shown.

    Args:
        folder: A results folder (a command's ``--out``), or ``blocks``' ``blocks/`` folder.
        root: The report's folder; sources are named relative to it.
        dpi: Resolution of the figures.

    Returns:
        (sections, skipped): skipped names each file found but not shown, with the reason.

    Raises:
        ValueError, FileNotFoundError: A result file is damaged or its other half is missing
            (the message names the file).
    """
    kinds: dict[str, str] = {}
    skipped: list[str] = []
    sections: list[Section] = []
    last: list[Section] = []
    used: set[str] = set()
    if (folder / "index.json").is_file():
        if _is_blocks_index(folder / "index.json"):
            section, used = blocks_section(folder, root, dpi)
            last.append(section)
        else:
            skipped.append(f"{_rel(folder / 'index.json', root)}: not a BlockSpectra index")
    if is_blocks_folder(folder / "blocks"):  # the --out of curvscope blocks
        last.append(blocks_section(folder / "blocks", root, dpi)[0])
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith(".") or path.name == "index.json":
            continue
        if not path.with_suffix(".npz").is_file():
            skipped.append(f"{_rel(path, root)}: no .npz beside it, so not a result")
            continue
        kind = read_kind(path)
        if kind is None:
            skipped.append(f"{_rel(path, root)}: no 'kind' field")
        else:
            kinds[path.name[: -len(".json")]] = kind
    for path in sorted(folder.glob("*.npz")):
        if not path.name.startswith(".") and not path.with_suffix(".json").is_file():
            skipped.append(f"{_rel(path, root)}: no .json beside it")
    if kinds.get("decompose") == "Decomposition":
        section, consumed = decompose_section(folder, root, dpi)
        last.insert(0, section)
        used |= consumed | {"decompose"}
    for kind in ORDER[:-1]:
        for stem in sorted(s for s, k in kinds.items() if k == kind and s not in used):
            section, consumed = _section(kind, folder, stem, kinds, root, dpi)
            sections.append(section)
            used |= consumed | {stem}
    for stem in sorted(s for s, k in kinds.items() if k == "SpectrumStructure" and s not in used):
        structure = SpectrumStructure.load(folder / stem)
        sections.append(
            Section(
                "Spectrum structure",
                _rel(folder / f"{stem}.json", root),
                facts=facts(structure.params, n=structure.n),
                tables=[structure_table(structure)],
            )
        )
        used.add(stem)
    for stem, kind in sorted(kinds.items()):
        if stem not in used:
            skipped.append(f"{_rel(folder / f'{stem}.json', root)}: kind {kind!r} is not shown")
    for section in sections + last:
        section.kind = SECTION_KINDS.get(section.meta.get("kind", ""), "structure")
    return sections + last, skipped


def _section(
    kind: str, folder: Path, stem: str, kinds: dict[str, str], root: Path, dpi: int
) -> tuple[Section, set[str]]:
    """The section of result ``stem`` of ``kind``, and the other stems it showed."""
    source = _rel(folder / f"{stem}.npz", root)
    if kind == "SpectralDensity":
        consumed = set()
        structure = pairs = None
        if kinds.get(f"{stem}.structure") == "SpectrumStructure":
            structure = SpectrumStructure.load(folder / f"{stem}.structure")
            consumed.add(f"{stem}.structure")
        top = "top_eigenpairs" if stem == "density" else f"{stem}_top_eigenpairs"
        if kinds.get(top) == "Eigenpairs":
            pairs = Eigenpairs.load(folder / top)
            consumed.add(top)
        density = SpectralDensity.load(folder / stem)
        return density_section(density, source, structure, pairs, dpi), consumed
    if kind == "Eigenpairs":
        return eigenpairs_section(Eigenpairs.load(folder / stem), source), set()
    if kind == "Trace":
        return trace_section(TraceEstimate.load(folder / stem), source), set()
    return overlap_section(GradientOverlap.load(folder / stem), source, dpi), set()


def density_section(
    density: SpectralDensity,
    source: str,
    structure: SpectrumStructure | None = None,
    pairs: Eigenpairs | None = None,
    dpi: int = 100,
    title: str | None = None,
) -> Section:
    """A density: figure (linear and log), structure, and the top eigenvalues if measured.

    Args:
        density: The SLQ result.
        source: Where it was read from.
        structure: Its saved structure; default: computed here from the stored quadrature
            (no operator products) with gap factor :data:`GAP_FACTOR`.
        pairs: Eigenpairs to mark and tabulate (``density --mark-top``).
        dpi: Resolution of the figure.
        title: Heading (default: "<operator> eigenvalue density").
    """
    word, _ = operator_words(density.meta)
    steps = int(density.num_steps.max()) if density.num_steps.size else 0
    products = int(density.num_steps.sum())
    notes: list[str] = []
    if pairs is not None and pairs.values.size:
        marks, label = pairs.values, f"top {pairs.values.size} eigenvalues"
    else:
        marks, label = np.array([density.lambda_max]), "largest Ritz value"
    figures = draw(
        lambda: plot_density(density, top_eigenvalues=marks, top_label=label),
        f"{word} eigenvalue density, linear and log scale",
        f"Gaussian-smoothed SLQ density (Ghorbani et al. 2019 width); dashed: {label}.",
        dpi,
        notes,
    )
    computed = structure is None
    if structure is None:
        structure = spectrum_structure(density, gap_factor=GAP_FACTOR)
    table = structure_table(structure)
    if computed:
        table.note += (
            f" Computed for this report from the stored quadrature (gap factor {GAP_FACTOR:g})."
        )
    tables = [table]
    if pairs is not None:
        tables.append(eigenpairs_table(pairs, f"Top {pairs.values.size} eigenvalues"))
    return Section(
        title or f"{capitalized(word)} eigenvalue density",
        source,
        f"Eigenvalue density of the {word} by stochastic Lanczos quadrature: "
        f"{density.num_probes} probes x {steps} Lanczos steps, {products:,} operator products; "
        f"Ritz values from {number(density.lambda_min)} to {number(density.lambda_max)}.",
        facts(density.meta, n=density.n),
        figures,
        tables,
        notes,
        {**density.meta, "n": density.n, "kind": "SpectralDensity"},
    )


def eigenpairs_section(pairs: Eigenpairs, source: str, title: str | None = None) -> Section:
    """Eigenvalues with their residuals and whether each met the tolerance."""
    word, _ = operator_words(pairs.meta)
    which = pairs.meta.get("which", "largest")
    k = int(pairs.values.size)
    n = pairs.vectors.shape[0] if pairs.vectors.size else None
    summary = f"The {k} {which} eigenvalue{'' if k == 1 else 's'} of the {word}"
    if "tol" in pairs.meta:
        summary += f", each driven to a relative residual of {number(pairs.meta['tol'], 3)}"
    return Section(
        title or f"{capitalized(which)} eigenvalues of the {word}",
        source,
        summary + ".",
        facts(pairs.meta, n=n),
        tables=[eigenpairs_table(pairs, f"{k} {which} eigenvalue{'' if k == 1 else 's'}")],
        meta={**pairs.meta, "kind": "Eigenpairs"},
    )


def trace_section(estimate: TraceEstimate, source: str) -> Section:
    """The trace with its standard error."""
    word, symbol = operator_words(estimate.meta)
    method = estimate.meta.get("method", "a stochastic estimator")
    products = estimate.meta.get("num_products")
    summary = (
        f"tr({symbol}) of the {word} by {method}"
        + (f" from {products} products" if products is not None else "")
        + f": {number(estimate.value, 6)} ± {number(estimate.std_error, 2)} (standard error)."
    )
    n = estimate.meta.get("n")
    return Section(
        f"Trace of the {word}",
        source,
        summary,
        facts(estimate.meta),
        tables=[trace_table(estimate, n if isinstance(n, int) else None, symbol)],
        meta={
            **estimate.meta,
            "value": estimate.value,
            "std_error": estimate.std_error,
            "kind": "Trace",
        },
    )


def overlap_section(result: GradientOverlap, source: str, dpi: int = 100) -> Section:
    """The gradient's shares in the top eigenspace, and its curvature."""
    word, _ = operator_words(result.meta)
    notes: list[str] = []
    figures = draw(
        lambda: plot_overlap(result),
        "gradient shares per top eigenvector",
        "Share (u_i . g)^2 / ||g||^2 of each eigenvector; dashed: 1/n, a random direction's.",
        dpi,
        notes,
    )
    residuals = result.meta.get("residuals")
    if not (isinstance(residuals, list) and len(residuals) == result.k):
        residuals = [None] * result.k
    rows = [
        (str(i + 1), number(value, 8), number(share, 4), number(residual, 3))
        for i, (value, share, residual) in enumerate(
            zip(result.eigenvalues, result.shares, residuals, strict=True)
        )
    ]
    ratio = result.overlap / result.baseline if result.baseline > 0 else float("nan")
    summary_rows = [
        (f"overlap with the top-{result.k} eigenspace", number(result.overlap, 4)),
        (f"random direction (k/n = {result.k}/{result.n:,})", number(result.baseline, 3)),
        ("overlap / random", number(ratio, 3)),
        ("curvature along the gradient g^T A g / ||g||^2", number(result.curvature, 6)),
        ("||g||", number(result.gradient_norm, 6)),
    ]
    return Section(
        "Gradient in the top eigenspace",
        source,
        f"Share of the full-data gradient in the span of the {word}'s {result.k} top "
        f"eigenvectors: {number(result.overlap, 3)} (a random direction: "
        f"{number(result.baseline, 2)}).",
        facts(result.meta, n=result.n, k=result.k),
        figures,
        [
            Table(("quantity", "value"), summary_rows, "Overlap", numeric=frozenset({1})),
            Table(
                ("#", "eigenvalue", "share of ||g||^2", "residual"),
                rows,
                "Per eigenvector",
                numeric=frozenset({0, 1, 2, 3}),
            ),
        ],
        notes,
        {**result.meta, "kind": "GradientOverlap"},
    )


def _term_order(name: str) -> tuple[int, str]:
    names = list(TERM_LABELS)
    return (names.index(name) if name in names else len(names), name)


def decompose_section(folder: Path, root: Path, dpi: int = 100) -> tuple[Section, set[str]]:
    """``curvscope decompose``: every term's density and structure, and the exact class terms.

    Returns:
        The section and the stems it showed (``density_TERM``, ``structure_TERM``).
    """
    arrays, meta = load_result(folder / "decompose")
    terms = meta.get("terms")
    if not isinstance(terms, dict) or not terms:
        raise ValueError(
            f"{folder / 'decompose.json'}: field 'terms' must be a non-empty JSON object: the "
            "result is damaged; rerun curvscope decompose"
        )
    names = sorted(terms, key=_term_order)
    densities: dict[str, SpectralDensity] = {}
    structures: dict[str, SpectrumStructure] = {}
    consumed: set[str] = set()
    for name in names:
        densities[name] = SpectralDensity.load(folder / f"density_{name}")
        structure_file = folder / f"structure_{name}"
        if structure_file.with_suffix(".json").is_file():
            structures[name] = SpectrumStructure.load(structure_file)
        else:
            try:
                structures[name] = SpectrumStructure.from_dict(terms[name])
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(
                    f"{folder / 'decompose.json'}: terms[{name!r}] is not a structure "
                    f"({type(error).__name__}: {error}): the result is damaged"
                ) from error
        consumed |= {f"density_{name}", f"structure_{name}"}
    first = densities[names[0]].meta
    notes: list[str] = []
    figures = draw(
        lambda: plot_densities(densities, structures=structures, labels=TERM_LABELS),
        "densities of the terms of the Hessian, log scale",
        "One log-scale panel per term; red dashed: outliers, grey dotted: bulk edges.",
        dpi,
        notes,
    )
    tables = [structures_table(structures, "Structure of each term", labels=TERM_LABELS)]
    exact = sorted(
        (
            (key[: -len("_eigenvalues")], values)
            for key, values in arrays.items()
            if key.endswith("_eigenvalues")
        ),
        key=lambda item: _term_order(item[0]),
    )
    if exact:
        tables.append(
            Table(
                ("class term", "exact eigenvalues", "count"),
                [
                    (TERM_LABELS.get(name, name.replace("_", " ")), numbers(v, 10), str(v.size))
                    for name, v in exact
                ],
                "Exact eigenvalues of the class terms (from their C vectors)",
                numeric=frozenset({2}),
            )
        )
    ratio = meta.get("residual_over_ggn")
    summary = (
        "The Hessian split into its Gauss-Newton part G and the residual H - G"
        + (f", and G into Papyan's class terms ({meta['class_loss']})" if exact else "")
        + "; one SLQ density per term."
    )
    if ratio is not None:
        summary += f" ||H - G||_2 / ||G||_2 = {number(ratio, 4)}."
    shown = {key: value for key, value in meta.items() if key != "terms"}
    versions = {key: value for key, value in first.items() if key.endswith("_version")}
    return (
        Section(
            "Decomposition of the Hessian",
            _rel(folder / "decompose.npz", root),
            summary,
            facts({**versions, **first, **shown, "operator": None, "term": None}),
            figures,
            tables,
            notes,
            {**shown, **versions},
        ),
        consumed,
    )


def is_blocks_folder(folder: Path) -> bool:
    """True when ``folder`` holds an ``index.json`` of kind BlockSpectra."""
    return (folder / "index.json").is_file() and _is_blocks_index(folder / "index.json")


def _is_blocks_index(path: Path) -> bool:
    try:
        index = json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(
            f"{path}: not valid JSON ({type(error).__name__}: {error}): the block spectra are "
            "damaged; rerun curvscope blocks"
        ) from error
    return isinstance(index, dict) and index.get("kind") == "BlockSpectra"


def blocks_section(folder: Path, root: Path, dpi: int = 100) -> tuple[Section, set[str]]:
    """``curvscope blocks``: one density per parameter group, side by side, and a table.

    Returns:
        The section and the stems it showed (each group's density and structure).
    """
    result = BlockSpectra.load(folder)
    index = json.loads((folder / "index.json").read_bytes().decode())
    consumed = {entry["stem"] for entry in index["groups"]}
    consumed |= {f"{stem}.structure" for stem in consumed}
    meta = dict(result.meta)
    word, _ = operator_words(meta)
    labels = {name: f"{name} (n = {result.structures[name].n:,})" for name in result.names}
    notes: list[str] = []
    figures = draw(
        lambda: plot_densities(
            result.densities,
            structures=result.structures,
            labels=labels,
            columns=min(4, len(result.names)),
        ),
        "density of each diagonal block, log scale",
        "One log-scale panel per block; red dashed: outliers, grey dotted: bulk edges.",
        dpi,
        notes,
    )
    groups = Table(
        ("block", "parameters"),
        [(name, ", ".join(params)) for name, params in result.groups.items()],
        "Parameters of each block",
    )
    total = sum(s.n for s in result.structures.values())
    section = Section(
        f"Diagonal {word} blocks",
        _rel(folder / "index.json", root),
        f"{len(result.names)} diagonal blocks of the {word} (every other parameter held "
        f"fixed), {total:,} parameters in all; one SLQ density each.",
        facts(meta, n=total),
        figures,
        [structures_table(result.structures, "Structure of each block", "block"), groups],
        notes,
        {**meta, "kind": "BlockSpectra"},
    )
    return section, consumed


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
