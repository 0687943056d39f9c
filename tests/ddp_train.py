"""Train a tiny FCR model with Lightning DDP on two CPU processes (run by tests/test_ddp.py).

``python tests/ddp_train.py OUT_DIR``. Lightning's "ddp" strategy starts this script
again for the second process, so both processes run all of it. Each process records the rows
it drew control partners for and the partners it drew (through a wrapper around
``ControlPool.sample``), and the checksum of its weights after training, in
``OUT_DIR/rank<r>.npz``; rank 0 also saves the model and its history.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import scvi
import torch

from conftest import small_screen  # this folder is on sys.path: the script runs from it
from fcr_tools import FCRModel
from fcr_tools._pairing import ControlPool


def main(out: Path) -> None:
    torch.set_num_threads(1)
    scvi.settings.seed = 0
    scvi.settings.logging_dir = out / "scvi_log"
    drawn: list[tuple[np.ndarray, np.ndarray]] = []
    sample = ControlPool.sample

    def recording_sample(self, rows):
        partners = sample(self, rows)
        drawn.append((np.asarray(rows).copy(), partners.copy()))
        return partners

    ControlPool.sample = recording_sample

    adata = small_screen(n_treatments=3)
    FCRModel.setup_anndata(
        adata, treatment_key="drug", dose_key="dose", covariate_keys="cell_line"
    )
    model = FCRModel(adata, n_latent_x=2, n_latent_t=2, n_latent_tx=2, n_hidden=16)
    model.train(
        max_epochs=1,
        batch_size=32,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    rank = model.trainer.global_rank
    weights = torch.cat([p.detach().reshape(-1).double() for p in model.module.parameters()])
    rows = np.concatenate([r for r, _ in drawn])
    partners = np.concatenate([p for _, p in drawn])
    np.savez(
        out / f"rank{rank}.npz",
        rows=rows,
        partners=partners,
        weights=weights.numpy(),
        world_size=model.trainer.world_size,
        train_idx=model.train_indices,
    )
    if model.trainer.is_global_zero:
        model.save(out / "model", save_anndata=True)
        history = {k: v.to_numpy(dtype=float).ravel().tolist() for k, v in model.history.items()}
        (out / "history.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    print(f"rank {os.environ.get('LOCAL_RANK', '0')} done", flush=True)
