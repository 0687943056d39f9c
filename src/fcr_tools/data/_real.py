"""Small real perturbation screens shipped with the package (no download).

The files live in ``fcr_tools/data/files/`` next to their licences (``LICENSES.md``) and
provenance (``README.md``). They are read with :mod:`importlib.resources`, so the loaders work
from an installed wheel as well as from a source tree. Every call reads the file again and
returns a new AnnData; changing it never affects a later call.
"""

from __future__ import annotations

from importlib import resources

import anndata as ad
import pandas as pd
import scanpy as sc

__all__ = ["glioblastoma_panobinostat", "norman19", "sciplex_gxe"]

_PERTURBENCH = "perturbench_devel.h5ad"
_GLIOBLASTOMA = "glioblastoma_panobinostat.h5ad"
CONTROL = "control"
VEHICLE = "DMSO"


def _resource(name: str):
    """The bundled file ``name`` (a :class:`importlib.resources.abc.Traversable`)."""
    return resources.files(__package__).joinpath("files", name)


def _read(name: str) -> ad.AnnData:
    """A new in-memory AnnData read from the bundled file ``name``."""
    with resources.as_file(_resource(name)) as path:
        return ad.read_h5ad(path)


def _categorical(values, categories: list[str] | None = None) -> pd.Categorical:
    """String categories; ``categories`` first in that order, the other values sorted after."""
    values = pd.Series(values).astype(str)
    found = sorted(set(values))
    order = [c for c in categories or [] if c in found]
    return pd.Categorical(values, categories=order + [c for c in found if c not in order])


def _perturbench(dataset: str) -> ad.AnnData:
    """The cells of ``obs["dataset"] == dataset`` of PerturBench's development file."""
    adata = _read(_PERTURBENCH)
    adata = adata[(adata.obs["dataset"] == dataset).to_numpy()].copy()
    # the file's own ``perturbation`` column holds the same labels as ``condition``
    adata.obs["perturbation"] = _categorical(adata.obs["condition"], [CONTROL])
    for key, column in adata.obs.items():
        if isinstance(column.dtype, pd.CategoricalDtype):
            adata.obs[key] = column.cat.remove_unused_categories()
    return adata


def sciplex_gxe() -> ad.AnnData:
    """sci-Plex-GxE: 3 glioblastoma cell lines x 9 CRISPRi knockdowns and control.

    McFaline-Figueroa et al. 2024: the cell lines A172, T98G and U87MG, each with knockdowns of
    MAP2K3, MAP2K6, MAP3K21, MAP4K3, MAP4K5, MAPK1, PLK4, SGK1 and TGFBR2 and controls; 46 to
    100 cells per (cell line, perturbation), 2,586 cells x 500 highly variable genes in all. A
    context x treatment screen with weak (knockdown) effects.

    The cells are those with ``obs["dataset"] == "mcfaline23"`` in the development data set of
    PerturBench (GitHub ``altoslabs/perturbench``, ``src/perturbench/data/resources/devel.h5ad``),
    shipped unchanged with ``fcr_tools`` under the BSD 3-Clause licence (Copyright (c) 2024, Altos
    Labs); the notice and the file's provenance are in ``fcr_tools/data/files/LICENSES.md`` and
    ``README.md``. No download is needed.

    Returns
    -------
    A new AnnData (2,586 cells x 500 genes) on every call:

    - ``X``: log-normalised expression (``log1p`` of counts per 10,000 over all genes, then
      restricted to the 500 genes; no raw counts in the file, so use the default Gaussian
      likelihood);
    - ``obs["cell_line"]``: categorical ``A172``, ``T98G``, ``U87MG`` (from ``cell_type``);
    - ``obs["perturbation"]``: categorical, the knocked-down gene or ``"control"`` (from
      ``condition``; ``control`` is the first category);
    - the file's other obs columns (``condition``, ``cell_type``, ``dataset``,
      ``perturbation_type``, ``ncounts``, ``ngenes``, ...), with unused categories removed.

    Register it with ``FCRModel.setup_anndata(adata, treatment_key="perturbation",
    covariate_keys="cell_line")``.

    Examples
    --------
    >>> from fcr_tools import FCRModel
    >>> from fcr_tools.data import sciplex_gxe
    >>> adata = sciplex_gxe()
    >>> adata.shape
    (2586, 500)
    >>> list(adata.obs["cell_line"].cat.categories)
    ['A172', 'T98G', 'U87MG']
    >>> FCRModel.setup_anndata(adata, treatment_key="perturbation", covariate_keys="cell_line")
    """
    adata = _perturbench("mcfaline23")
    adata.obs["cell_line"] = _categorical(adata.obs["cell_type"])
    return adata


def norman19() -> ad.AnnData:
    """Norman et al. 2019: K562 CRISPRa single and double perturbations.

    33 CRISPRa perturbations of one cell line (K562) and controls, 80 to 100 cells each (3,375
    cells x 500 highly variable genes): 18 single genes such as ``"KLF1"`` and 15 pairs written
    ``"A+B"`` such as ``"KLF1+MAP2K6"``, a combination-prediction task in one context. Only some
    genes of the pairs are also perturbed alone (KLF1 and MAP2K6 are; BPGM and SAMD1 of
    ``"BPGM+SAMD1"`` are not).

    The cells are those with ``obs["dataset"] == "norman19"`` in the development data set of
    PerturBench (GitHub ``altoslabs/perturbench``, ``src/perturbench/data/resources/devel.h5ad``),
    shipped unchanged with ``fcr_tools`` under the BSD 3-Clause licence (Copyright (c) 2024, Altos
    Labs); the notice and the file's provenance are in ``fcr_tools/data/files/LICENSES.md`` and
    ``README.md``. No download is needed.

    Returns
    -------
    A new AnnData (3,375 cells x 500 genes) on every call:

    - ``X``: log-normalised expression (``log1p`` of counts per 10,000 over all genes, then
      restricted to the 500 genes; no raw counts);
    - ``obs["perturbation"]``: categorical, ``"control"``, a gene or ``"A+B"`` (from
      ``condition``; ``control`` is the first category);
    - ``obs["cell_line"]``: ``"K562"`` for every cell;
    - the file's other obs columns (``condition``, ``cell_type``, ``dose``, ``dataset``, ...),
      with unused categories removed.

    Register it with ``FCRModel.setup_anndata(adata, treatment_key="perturbation")`` (one cell
    line, so no covariates).

    Examples
    --------
    >>> from fcr_tools import FCRModel
    >>> from fcr_tools.data import norman19
    >>> adata = norman19()
    >>> adata.shape
    (3375, 500)
    >>> "KLF1+MAP2K6" in adata.obs["perturbation"].cat.categories
    True
    >>> FCRModel.setup_anndata(adata, treatment_key="perturbation")
    """
    adata = _perturbench("norman19")
    adata.obs["cell_line"] = pd.Categorical(["K562"] * adata.n_obs)
    return adata


def glioblastoma_panobinostat(normalize: bool = True) -> ad.AnnData:
    """Glioblastoma tumour slices of 5 patients treated with DMSO or panobinostat.

    Zhao et al. 2021 (Genome Medicine 13:82): slices of the tumours of 5 patients (PW030,
    PW032, PW034, PW036, PW040) cultured with the vehicle DMSO or the HDAC inhibitor
    panobinostat (0.2 uM), 500 cells per (patient, treatment), 5,000 cells x 300 genes of UMI
    counts. A context (patient) x treatment design with one treatment: patient-specific drug
    response.

    The data are the example data of the R package lemur (GitHub ``const-ae/lemur``,
    ``data/glioblastoma_example_data.rda``), converted to h5ad and shipped with ``fcr_tools``
    under the MIT licence (Copyright (c) 2023 lemur authors); the notice and the file's
    provenance are in ``fcr_tools/data/files/LICENSES.md`` and ``README.md``. No download is
    needed.

    Parameters
    ----------
    normalize
        ``True``: ``X`` holds ``log1p`` of counts per 10,000 (:func:`scanpy.pp.normalize_total`
        with ``target_sum=1e4`` over the 300 genes, then :func:`scanpy.pp.log1p`), for the
        Gaussian likelihood. ``False``: ``X`` holds the raw counts (a copy of
        ``layers["counts"]``).

    Returns
    -------
    A new AnnData (5,000 cells x 300 genes) on every call:

    - ``layers["counts"]``: raw UMI counts (float32, sparse CSR);
    - ``X``: log-normalised expression or counts, see ``normalize``;
    - ``obs["patient"]``: categorical patient (from ``patient_id``);
    - ``obs["treatment"]``: categorical ``"DMSO"`` (the control; ``"ctrl"`` in the file's
      ``condition``) or ``"panobinostat"``;
    - ``obs["treatment_description"]``: the file's own ``treatment`` column
      (``"vehicle (DMSO)"``, ``"0.2 uM panobinostat"``), renamed so that ``treatment`` can hold
      the short labels;
    - the file's other obs columns (``patient_id``, ``condition``, ``sample_id``, ``age``,
      ``gender``, ``location``, ...);
    - ``var_names``: gene symbols (unique in this file); the Ensembl ids are in
      ``var["gene_id"]``.

    Register it with ``FCRModel.setup_anndata(adata, treatment_key="treatment",
    control_treatment="DMSO", covariate_keys="patient")``; for the negative binomial likelihood
    (``FCRModel(adata, likelihood="nb")``) add ``layer="counts"``.

    Examples
    --------
    >>> from fcr_tools import FCRModel
    >>> from fcr_tools.data import glioblastoma_panobinostat
    >>> adata = glioblastoma_panobinostat()
    >>> adata.shape
    (5000, 300)
    >>> list(adata.obs["treatment"].cat.categories)
    ['DMSO', 'panobinostat']
    >>> FCRModel.setup_anndata(
    ...     adata, treatment_key="treatment", control_treatment="DMSO", covariate_keys="patient"
    ... )
    """
    adata = _read(_GLIOBLASTOMA)
    counts = adata.layers["counts"]
    obs = adata.obs
    obs["patient"] = _categorical(obs["patient_id"])
    obs["treatment_description"] = obs["treatment"]
    obs["treatment"] = _categorical(
        obs["condition"].astype(str).replace({"ctrl": VEHICLE}), [VEHICLE]
    )
    symbols = adata.var.get("symbol")
    if symbols is not None and symbols.notna().all() and symbols.astype(str).is_unique:
        adata.var["gene_id"] = adata.var_names.to_numpy()
        adata.var_names = pd.Index(symbols.astype(str).to_numpy())
    adata.var.index.name = None
    adata.X = counts.copy()
    if normalize:
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    return adata
