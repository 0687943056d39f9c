"""The real screens shipped with the package: sci-Plex-GxE, Norman 2019, glioblastoma."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from fcr_tools import FCRModel
from fcr_tools.data import glioblastoma_panobinostat, norman19, sciplex_gxe

GXE_LINES = ["A172", "T98G", "U87MG"]
GXE_KNOCKDOWNS = [
    "MAP2K3",
    "MAP2K6",
    "MAP3K21",
    "MAP4K3",
    "MAP4K5",
    "MAPK1",
    "PLK4",
    "SGK1",
    "TGFBR2",
]
PATIENTS = ["PW030", "PW032", "PW034", "PW036", "PW040"]

SETUPS = {
    "sciplex_gxe": (sciplex_gxe, {"treatment_key": "perturbation", "covariate_keys": "cell_line"}),
    "norman19": (norman19, {"treatment_key": "perturbation"}),
    "glioblastoma_panobinostat": (
        glioblastoma_panobinostat,
        {"treatment_key": "treatment", "control_treatment": "DMSO", "covariate_keys": "patient"},
    ),
}


def _data(matrix) -> np.ndarray:
    """The stored values of a sparse or dense matrix."""
    return matrix.data if sparse.issparse(matrix) else np.asarray(matrix).ravel()


def _categories(adata, key: str) -> list[str]:
    column = adata.obs[key]
    assert isinstance(column.dtype, pd.CategoricalDtype), f"obs[{key!r}] is not categorical"
    return list(column.cat.categories)


def _same_labels(adata, key: str, other: str) -> None:
    """obs[key] and obs[other] hold the same labels, cell by cell."""
    left, right = adata.obs[key].astype(str), adata.obs[other].astype(str)
    assert (left.to_numpy() == right.to_numpy()).all(), f"obs[{key!r}] != obs[{other!r}]"


# ------------------------------------------------------------------ sci-Plex-GxE
def test_sciplex_gxe_design():
    adata = sciplex_gxe()
    assert adata.shape == (2586, 500)
    assert _categories(adata, "cell_line") == GXE_LINES
    assert _categories(adata, "perturbation") == ["control", *GXE_KNOCKDOWNS]
    # the original columns are kept, with unused categories (of the other data set) removed
    for key in ["condition", "cell_type", "dataset", "perturbation_type", "ncounts", "ngenes"]:
        assert key in adata.obs.columns
    assert _categories(adata, "dataset") == ["mcfaline23"]
    assert _categories(adata, "cell_type") == GXE_LINES
    assert len(_categories(adata, "condition")) == 10
    _same_labels(adata, "perturbation", "condition")
    _same_labels(adata, "cell_line", "cell_type")
    # every (cell line, perturbation) pair is present, controls in every line
    table = pd.crosstab(adata.obs["cell_line"], adata.obs["perturbation"])
    assert table.shape == (3, 10)
    assert table.to_numpy().min() >= 46
    assert (table["control"] == 100).all()
    assert adata.obs_names.is_unique and adata.var_names.is_unique


def test_sciplex_gxe_is_log_normalised():
    values = _data(sciplex_gxe().X)
    assert np.isfinite(values).all()
    assert values.min() >= 0
    assert not np.allclose(values, np.round(values))  # not counts
    assert values.max() < 15  # log scale


# ------------------------------------------------------------------ Norman 2019
def test_norman19_design():
    adata = norman19()
    assert adata.shape == (3375, 500)
    perturbations = _categories(adata, "perturbation")
    assert perturbations[0] == "control"
    assert len(perturbations) == 34
    doubles = [p for p in perturbations if "+" in p]
    assert len(doubles) == 15
    assert "KLF1+MAP2K6" in doubles
    assert all(len(p.split("+")) == 2 for p in doubles)
    assert len(perturbations) - 1 - len(doubles) == 18  # singles
    assert _categories(adata, "cell_line") == ["K562"]
    assert _categories(adata, "dataset") == ["norman19"]
    _same_labels(adata, "perturbation", "condition")
    counts = adata.obs["perturbation"].value_counts()
    assert counts["control"] == 100
    assert counts.min() >= 80
    values = _data(adata.X)
    assert values.min() >= 0
    assert not np.allclose(values, np.round(values))


# ------------------------------------------------------------------ glioblastoma
def test_glioblastoma_design():
    adata = glioblastoma_panobinostat()
    assert adata.shape == (5000, 300)
    assert _categories(adata, "patient") == PATIENTS
    assert _categories(adata, "treatment") == ["DMSO", "panobinostat"]
    table = pd.crosstab(adata.obs["patient"], adata.obs["treatment"])
    assert table.shape == (5, 2)
    assert (table.to_numpy() == 500).all()
    # the original columns are kept; the file's own "treatment" column is renamed
    for key in ["patient_id", "condition", "sample_id", "age", "gender", "location"]:
        assert key in adata.obs.columns
    assert set(adata.obs["condition"].astype(str)) == {"ctrl", "panobinostat"}
    adata.obs["expected"] = adata.obs["condition"].astype(str).replace({"ctrl": "DMSO"})
    _same_labels(adata, "treatment", "expected")
    assert set(adata.obs["treatment_description"].astype(str)) == {
        "vehicle (DMSO)",
        "0.2 uM panobinostat",
    }
    # gene symbols as var_names, Ensembl ids kept
    assert adata.var_names.is_unique
    assert (adata.var_names == adata.var["symbol"].astype(str)).all()
    assert adata.var["gene_id"].str.startswith("ENSG").all()
    assert adata.var.index.name is None


def test_glioblastoma_counts_and_normalisation():
    adata = glioblastoma_panobinostat()
    counts = adata.layers["counts"]
    assert sparse.issparse(counts) and counts.format == "csr"
    assert counts.dtype == np.float32
    assert counts.data.min() >= 0
    np.testing.assert_array_equal(counts.data, np.round(counts.data))
    assert sparse.issparse(adata.X)
    # X = log1p(counts per 10,000)
    totals = np.expm1(adata.X.toarray().astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(totals, 1e4, rtol=1e-3)
    assert not np.allclose(adata.X.data, np.round(adata.X.data))


def test_glioblastoma_without_normalisation():
    adata = glioblastoma_panobinostat(normalize=False)
    assert sparse.issparse(adata.X)
    assert (adata.X != adata.layers["counts"]).nnz == 0
    # X and the counts layer are separate matrices
    adata.X.data[:] = -1.0
    assert adata.layers["counts"].data.min() >= 0


# ------------------------------------------------------------------ every loader
@pytest.mark.parametrize("name", list(SETUPS))
def test_each_call_returns_a_new_object(name):
    load, setup = SETUPS[name]
    first = load()
    key = setup["treatment_key"]
    pristine_obs = first.obs.copy()
    pristine_x = _data(first.X).copy()
    pristine_genes = first.var_names.copy()
    # change the first object in place, everywhere
    _data(first.X)[:] = -1.0
    for layer in first.layers.values():
        _data(layer)[:] = -1.0
    first.obs[key] = first.obs[key].cat.rename_categories(lambda c: f"changed_{c}")
    first.obs["extra"] = 1
    first.var_names = [f"g{i}" for i in range(first.n_vars)]
    first.uns["extra"] = True

    second = load()
    assert second is not first
    np.testing.assert_array_equal(_data(second.X), pristine_x)
    for layer in second.layers.values():
        assert _data(layer).min() >= 0
    pd.testing.assert_frame_equal(second.obs, pristine_obs)
    assert (second.var_names == pristine_genes).all()
    assert "extra" not in second.uns


@pytest.mark.parametrize("name", list(SETUPS))
def test_setup_anndata_accepts_the_screen(name):
    load, setup = SETUPS[name]
    adata = load()
    FCRModel.setup_anndata(adata, **setup)
    assert "_scvi_uuid" in adata.uns


def test_glioblastoma_counts_setup_for_nb():
    adata = glioblastoma_panobinostat(normalize=False)
    FCRModel.setup_anndata(
        adata,
        treatment_key="treatment",
        control_treatment="DMSO",
        covariate_keys="patient",
        layer="counts",
    )
    FCRModel(adata, likelihood="nb")


def test_licence_and_provenance_ship_next_to_the_data():
    folder = resources.files("fcr_tools.data").joinpath("files")
    for name in [
        "perturbench_devel.h5ad",
        "glioblastoma_panobinostat.h5ad",
        "LICENSES.md",
        "README.md",
    ]:
        assert folder.joinpath(name).is_file(), name
    licences = folder.joinpath("LICENSES.md").read_text(encoding="utf-8")
    for notice in [
        "BSD 3-Clause License",
        "Copyright (c) 2024, Altos Labs",
        "MIT License",
        "Copyright (c) 2023 lemur authors",
        "perturbench_devel.h5ad",
        "glioblastoma_panobinostat.h5ad",
    ]:
        assert notice in licences, notice
    readme = folder.joinpath("README.md").read_text(encoding="utf-8")
    for origin in [
        "altoslabs/perturbench",
        "d357dfae3b50968e800e9f5f273ff145080ae67c",
        "const-ae/lemur",
        "0e62bc1287b17deec678f7db435ec09098a475f2",
    ]:
        assert origin in readme, origin
