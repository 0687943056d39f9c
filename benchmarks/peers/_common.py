"""Input/output shared by the peer adapters (``run_biolord.py``, ``run_cpa.py``).

Runs inside each peer's own virtual environment (Python 3.10 or 3.11, anndata 0.9 or newer),
so it needs only numpy, pandas and anndata. It never imports fcr_tools.

Contract of every adapter::

    python run_PEER.py --train TRAIN.h5ad --queries QUERIES.json --out PRED.h5ad \
        [--epochs N] [--seed S] [--threads T] [peer options]

* ``TRAIN.h5ad``: training cells; obs ``cell_line`` (context), ``drug`` (``"control"`` for
  controls) and ``dose`` (float, 0 for controls); ``X`` log-normalised
  (``log1p(counts / total * 1e4)``); raw counts in ``layers["counts"]`` when available. Nothing
  else of the file is read (a simulated screen's ground truth in ``uns`` / ``obsm`` never
  reaches a peer).
* ``QUERIES.json``: a list of ``{"cell_line": ..., "drug": ..., "dose": ...}``.
* ``PRED.h5ad``: for each query, one block of rows: the cell line's training control cells
  carried to (drug, dose) by the peer, on the scale of ``X``; obs ``cell_line``, ``drug``,
  ``dose`` and ``source_cell`` (the control cell each row was predicted from); ``uns["peer"]``
  records the peer, its version, hyperparameters, epochs run and timings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

CONTROL = "control"
SCALE_FACTOR = 1e4  # the target sum of the log-normalisation of X


def parse_args(peer: str, epochs_help: str, add_arguments=None, argv=None) -> argparse.Namespace:
    """The shared CLI; ``add_arguments(parser)`` adds a peer's own options."""
    parser = argparse.ArgumentParser(
        description=f"Train {peer} on TRAIN.h5ad and predict held-out (cell line, drug, dose) "
        "groups from each cell line's training control cells."
    )
    parser.add_argument("--train", required=True, type=Path, help="training cells (.h5ad)")
    parser.add_argument("--queries", required=True, type=Path, help="JSON list of queries")
    parser.add_argument("--out", required=True, type=Path, help="predictions (.h5ad)")
    parser.add_argument("--epochs", type=int, default=None, help=f"maximum epochs ({epochs_help})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)"
    )
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    return args


def seed_everything(seed: int, threads: int = 0) -> None:
    import torch

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the peers draw from numpy's global RNG)
    torch.manual_seed(seed)
    if threads > 0:
        torch.set_num_threads(threads)


def load_train(path: Path) -> ad.AnnData:
    """A clean AnnData with only X, layers["counts"] (if any) and obs cell_line/drug/dose."""
    src = ad.read_h5ad(path)
    missing = [c for c in ("cell_line", "drug", "dose") if c not in src.obs.columns]
    if missing:
        raise SystemExit(f"{path}: obs lacks column(s) {missing}")
    X = src.X.toarray() if sparse.issparse(src.X) else np.asarray(src.X)
    layers = {}
    if "counts" in src.layers:
        counts = src.layers["counts"]
        layers["counts"] = counts.toarray() if sparse.issparse(counts) else np.asarray(counts)
        layers["counts"] = layers["counts"].astype(np.float32)
    drug = src.obs["drug"].astype(str).to_numpy()
    if not (drug == CONTROL).any():
        raise SystemExit(f"{path}: no control cells (drug == {CONTROL!r})")
    dose = pd.to_numeric(src.obs["dose"], errors="raise").to_numpy(dtype=np.float64)
    dose[drug == CONTROL] = 0.0
    cell_lines = sorted(set(src.obs["cell_line"].astype(str)))
    drugs = [CONTROL, *sorted(set(drug) - {CONTROL})]
    obs = pd.DataFrame(
        {
            "cell_line": pd.Categorical(src.obs["cell_line"].astype(str), categories=cell_lines),
            "drug": pd.Categorical(drug, categories=drugs),
            "dose": dose,
        },
        index=pd.Index(src.obs_names.astype(str)),
    )
    out = ad.AnnData(
        X=X.astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(src.var_names.astype(str))),
        layers=layers or None,
    )
    return out


def load_queries(path: Path, train: ad.AnnData) -> list[dict]:
    queries = json.loads(Path(path).read_text())
    if not isinstance(queries, list) or not queries:
        raise SystemExit(f"{path}: expected a non-empty JSON list of queries")
    lines = set(train.obs["cell_line"].astype(str))
    drugs = set(train.obs["drug"].astype(str)) - {CONTROL}
    control_lines = set(train.obs.loc[train.obs["drug"] == CONTROL, "cell_line"].astype(str))
    out = []
    for i, q in enumerate(queries):
        try:
            cl, drug, dose = str(q["cell_line"]), str(q["drug"]), float(q["dose"])
        except (KeyError, TypeError, ValueError) as err:
            raise SystemExit(f"{path}: query {i} ({q!r}) needs cell_line, drug, dose") from err
        if cl not in lines or cl not in control_lines:
            raise SystemExit(f"query {i}: cell line {cl!r} has no training control cells")
        if drug not in drugs:
            raise SystemExit(f"query {i}: drug {drug!r} never seen in training")
        if not dose > 0:
            raise SystemExit(f"query {i}: dose must be > 0, got {dose}")
        out.append({"cell_line": cl, "drug": drug, "dose": dose})
    return out


def control_indices(train: ad.AnnData, cell_line: str) -> np.ndarray:
    obs = train.obs
    return np.flatnonzero(
        (obs["drug"].astype(str) == CONTROL).to_numpy()
        & (obs["cell_line"].astype(str) == cell_line).to_numpy()
    )


def lognormalize(counts: np.ndarray) -> np.ndarray:
    """Counts (or expected counts) -> the scale of X: log1p(c / sum(c) * 1e4) per cell."""
    counts = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    total = counts.sum(axis=1, keepdims=True)
    total[total == 0] = 1.0
    return np.log1p(counts / total * SCALE_FACTOR)


def write_predictions(
    path: Path,
    train: ad.AnnData,
    queries: list[dict],
    blocks: list[np.ndarray],
    sources: list[np.ndarray],
    info: dict,
) -> ad.AnnData:
    obs = []
    for q, block, src in zip(queries, blocks, sources, strict=True):
        if block.shape != (len(src), train.n_vars):
            raise RuntimeError(f"prediction block of shape {block.shape} for {len(src)} cells")
        obs.append(
            pd.DataFrame(
                {
                    "cell_line": q["cell_line"],
                    "drug": q["drug"],
                    "dose": float(q["dose"]),
                    "source_cell": train.obs_names[src].to_numpy(),
                }
            )
        )
    obs = pd.concat(obs, ignore_index=True)
    obs.index = pd.Index([f"pred_{i}" for i in range(len(obs))])
    for col in ("cell_line", "drug"):
        obs[col] = obs[col].astype("category")
    X = np.concatenate(blocks, axis=0).astype(np.float32)
    if not np.isfinite(X).all():
        raise RuntimeError("non-finite predictions")
    pred = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=train.var_names.copy()))
    pred.uns["peer"] = json.dumps(info, default=str)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pred.write_h5ad(path)
    return pred


class Timer:
    def __init__(self):
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.perf_counter() - self.start, 2)
