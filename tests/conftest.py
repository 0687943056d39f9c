"""Shared fixtures: small simulated screens and tiny, quickly trained FCR models."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch

from fcr_tools import FCRModel
from fcr_tools.data import simulate_screen

# a screen small enough to train in well under a second
SCREEN = {
    "n_cell_lines": 3,
    "n_treatments": 4,
    "doses": (0.3, 1.0),
    "n_cells_per_condition": 8,
    "n_genes": 30,
    "n_latent_x": 2,
    "n_latent_t": 2,
    "n_latent_tx": 2,
    "seed": 0,
}
SETUP = {"treatment_key": "drug", "dose_key": "dose", "covariate_keys": "cell_line"}
TINY = {"n_latent_x": 2, "n_latent_t": 3, "n_latent_tx": 2, "n_hidden": 16, "n_covariate_embed": 4}
TRAIN = {"max_epochs": 2, "batch_size": 64, "enable_progress_bar": False}

# the models are tiny: one thread is as fast and does not fight pytest-xdist workers
torch.set_num_threads(1)


def small_screen(**overrides) -> ad.AnnData:
    """A fresh simulated screen with the SCREEN settings (``overrides`` replace them)."""
    return simulate_screen(**{**SCREEN, **overrides})


@pytest.fixture(autouse=True)
def _isolated_run(tmp_path, monkeypatch):
    """Seed scvi-tools and keep every file a test (or Lightning) writes out of the repo."""
    monkeypatch.chdir(tmp_path)
    old_dir = scvi.settings.logging_dir
    scvi.settings.logging_dir = tmp_path / "scvi_log"
    scvi.settings.seed = 0
    yield
    scvi.settings.logging_dir = old_dir


@pytest.fixture(scope="session")
def _screen_template() -> ad.AnnData:
    return small_screen()


@pytest.fixture
def adata(_screen_template) -> ad.AnnData:
    """A fresh copy of the small simulated screen (log-normalised X, raw counts layer)."""
    return _screen_template.copy()


@pytest.fixture(scope="session")
def _combo_template() -> ad.AnnData:
    return small_screen(combinations=[("drug_0", "drug_1")])


@pytest.fixture
def combo_adata(_combo_template) -> ad.AnnData:
    """A fresh screen with the combination "drug_0+drug_1" (string doses "d+d")."""
    return _combo_template.copy()


@pytest.fixture
def build_model():
    """Factory: register ``adata``, build a tiny FCRModel and (optionally) train it.

    ``build_model(adata, setup=None, train=None, likelihood="gaussian", **model_kwargs)``;
    ``setup`` updates the default setup arguments, ``train`` the default training
    arguments, ``train=False`` skips training.
    """

    def _build(adata, setup=None, train=None, likelihood="gaussian", **model_kwargs):
        FCRModel.setup_anndata(adata, **{**SETUP, **(setup or {})})
        scvi.settings.seed = 0
        model = FCRModel(adata, likelihood=likelihood, **{**TINY, **model_kwargs})
        if train is not False:
            model.train(**{**TRAIN, **(train or {})})
        return model

    return _build


@pytest.fixture
def trained_model(adata, build_model) -> FCRModel:
    """A tiny gaussian FCR model trained for two epochs on ``adata``."""
    return build_model(adata)


@pytest.fixture
def make_screen():
    """Factory of fresh simulated screens: the small screen's settings, ``overrides`` applied."""
    return small_screen


def _is_scvi_key(key) -> bool:
    return str(key).startswith("_scvi")


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


@pytest.fixture
def snapshot():
    """``check = snapshot(adata)``; later ``check(adata)`` asserts nothing but scvi keys changed.

    obs columns, obsm / layers / uns keys starting with ``_scvi`` may be added; everything
    else (X, layers, obsm values, obs values and dtypes, var) must be identical.
    """

    def _take(adata: ad.AnnData):
        before = {
            "X": _dense(adata.X).copy(),
            "X_type": type(adata.X),
            "obs": adata.obs.copy(),
            "var": adata.var.copy(),
            "obsm": {k: np.array(_dense(v), copy=True) for k, v in adata.obsm.items()},
            "layers": {k: _dense(v).copy() for k, v in adata.layers.items()},
            "uns": set(adata.uns),
            "shape": adata.shape,
        }

        def _check(after: ad.AnnData):
            assert after.shape == before["shape"]
            assert type(after.X) is before["X_type"]
            np.testing.assert_array_equal(_dense(after.X), before["X"])
            assert after.X.dtype == before["X"].dtype
            added = [c for c in after.obs.columns if c not in before["obs"].columns]
            assert all(_is_scvi_key(c) for c in added), added
            pd.testing.assert_frame_equal(after.obs[list(before["obs"].columns)], before["obs"])
            pd.testing.assert_frame_equal(after.var, before["var"])
            for name in ("obsm", "layers"):
                current = getattr(after, name)
                added = [k for k in current if k not in before[name]]
                assert all(_is_scvi_key(k) for k in added), (name, added)
                for key, value in before[name].items():
                    assert key in current, (name, key)
                    np.testing.assert_array_equal(_dense(current[key]), value)
            added = set(after.uns) - before["uns"]
            assert all(_is_scvi_key(k) for k in added), added
            assert before["uns"] <= set(after.uns)

        return _check

    return _take
