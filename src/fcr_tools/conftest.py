"""Fixtures of the doctests: ``python -m pytest`` runs the Examples of every docstring.

Examples of methods and of functions that take a trained model use the names ``model`` and
``adata``; here they are a tiny :class:`~fcr_tools.FCRModel` trained for two epochs and its
simulated screen (192 cells, 30 genes; treatment ``"drug"``, dose ``"dose"``, covariate
``"cell_line"``; one held-out pair in ``obs["split"]``, which, to stay quick, is trained on
too), made once per session. Each doctest runs in its own temporary directory.

This file is for pytest only and is left out of the wheel (``pyproject.toml``).
"""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import scvi
import torch

from fcr_tools import FCRModel
from fcr_tools.data import simulate_screen

SCREEN = {
    "n_cell_lines": 2,
    "n_treatments": 3,
    "doses": (0.3, 1.0),
    "n_cells_per_condition": 12,
    "n_genes": 30,
    "n_latent_x": 2,
    "n_latent_t": 2,
    "n_latent_tx": 2,
    "n_holdout_pairs": 1,
    "seed": 0,
}
MODEL = {"n_latent_x": 2, "n_latent_t": 2, "n_latent_tx": 2, "n_hidden": 16}


@pytest.fixture(scope="session")
def _trained():
    torch.set_num_threads(1)  # tiny networks: one thread is as fast
    scvi.settings.seed = 0
    adata = simulate_screen(**SCREEN)
    FCRModel.setup_anndata(
        adata, treatment_key="drug", dose_key="dose", covariate_keys="cell_line"
    )
    model = FCRModel(adata, **MODEL)
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    return model, adata


@pytest.fixture(autouse=True)
def _doctest_run(request, doctest_namespace, tmp_path, monkeypatch):
    """``model`` and ``adata`` in the namespace; files, logs and figures kept out of the repo."""
    doctest_namespace["model"], doctest_namespace["adata"] = request.getfixturevalue("_trained")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(scvi.settings, "logging_dir", tmp_path / "scvi_log")
    monkeypatch.setattr(scvi.settings, "verbosity", logging.WARNING)  # no INFO lines in stdout
    scvi.settings.seed = 0
    yield
    plt.close("all")
