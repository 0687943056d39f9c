"""Saved models of one scvi-tools version, for checking that another version loads them.

``python tests/saved_models.py`` trains a tiny FCR model on the small simulated screen and
saves it, without its data, to ``tests/data/saved_models/scvi-tools-<version>/`` together with
``expected.npz``: its latents and counterfactual predictions for the first cells, computed
before saving. ``tests/test_saved_models.py`` loads every saved directory there under the
installed scvi-tools and compares. Run it once under each scvi-tools version the package
supports (the directory name records which wrote it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scvi
import torch

ROOT = Path(__file__).parent / "data" / "saved_models"
SCREEN = {
    "n_cell_lines": 2,
    "n_treatments": 3,
    "doses": (1.0,),
    "n_cells_per_condition": 8,
    "n_genes": 20,
    "seed": 0,
}
SETUP = {"treatment_key": "drug", "dose_key": "dose", "covariate_keys": "cell_line"}
MODEL = {"n_latent_x": 2, "n_latent_t": 2, "n_latent_tx": 2, "n_hidden": 8, "n_layers": 1}
N_CELLS = 12  # cells whose outputs are recorded
TREATMENT = "drug_1"  # the counterfactual treatment


def screen():
    """The screen every saved model was trained on (the same under every version)."""
    from fcr_tools.data import simulate_screen

    return simulate_screen(**SCREEN)


def outputs(model, adata) -> dict[str, np.ndarray]:
    """What a saved model must reproduce once loaded: latents and counterfactuals."""
    cells = np.arange(N_CELLS)
    latents = model.get_latent_representation(adata, indices=cells)
    predicted = model.predict_counterfactual(adata[:N_CELLS], treatment=TREATMENT, dose=1.0)
    return {"latents": latents, "counterfactual": np.asarray(predicted.X)}


def write(root: Path = ROOT) -> Path:
    """Train, save and record a model under the installed scvi-tools; return its directory."""
    from fcr_tools import FCRModel

    torch.set_num_threads(1)
    scvi.settings.seed = 0
    adata = screen()
    FCRModel.setup_anndata(adata, **SETUP)
    model = FCRModel(adata, **MODEL)
    model.train(max_epochs=3, batch_size=32, enable_progress_bar=False, accelerator="cpu")
    path = root / f"scvi-tools-{scvi.__version__}"
    model.save(str(path), overwrite=True)
    np.savez(path / "expected.npz", **outputs(model, screen()))
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
