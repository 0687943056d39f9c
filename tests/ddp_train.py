"""Train tiny FCR models with Lightning DDP on two CPU processes (run by tests/test_ddp.py).

``python tests/ddp_train.py OUT_DIR STORE``. Lightning's "ddp" strategy starts this script
again for the second process, so both processes run all of it: two trainings, one on a screen
simulated in memory ("memory") and one on the on-disk store ``STORE`` (an ``.h5ad`` written by
the test), which every process opens in backed mode and reads its minibatches from ("store").
The second training reuses the processes and the process group of the first. For each, each
process records the rows it drew control partners for and the partners it drew (through a
wrapper around ``ControlPool.sample``), and the checksum of its weights after training, in
``OUT_DIR/<name>_rank<r>.npz``; rank 0 also saves the model (``OUT_DIR/<name>_model``) and its
history (``OUT_DIR/<name>_history.json``).
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
from fcr_tools.data import read_store

DRAWN: list[tuple[np.ndarray, np.ndarray]] = []


def recording_sample(self, rows, _sample=ControlPool.sample):
    partners = _sample(self, rows)
    DRAWN.append((np.asarray(rows).copy(), partners.copy()))
    return partners


def train(adata, out: Path, name: str) -> None:
    DRAWN.clear()
    scvi.settings.seed = 0
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
    np.savez(
        out / f"{name}_rank{rank}.npz",
        rows=np.concatenate([r for r, _ in DRAWN]),
        partners=np.concatenate([p for _, p in DRAWN]),
        weights=weights.numpy(),
        world_size=model.trainer.world_size,
        train_idx=model.train_indices,
        backed=model.adata.isbacked,
    )
    if model.trainer.is_global_zero:
        model.save(out / f"{name}_model", save_anndata=not adata.isbacked)
        history = {k: v.to_numpy(dtype=float).ravel().tolist() for k, v in model.history.items()}
        (out / f"{name}_history.json").write_text(json.dumps(history))


def main(out: Path, store: Path) -> None:
    torch.set_num_threads(1)
    scvi.settings.logging_dir = out / "scvi_log"
    ControlPool.sample = recording_sample
    train(small_screen(n_treatments=3), out, "memory")
    train(read_store(store), out, "store")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"rank {os.environ.get('LOCAL_RANK', '0')} done", flush=True)
