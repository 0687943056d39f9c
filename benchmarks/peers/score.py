"""Score peer predictions (PRED.h5ad files of the adapters) side by side with the baselines.

Runs in fcr_tools' own environment (not a peer's)::

    python benchmarks/peers/score.py --adata ALL.h5ad --pred biolord=PRED1.h5ad cpa=PRED2.h5ad \
        [--out scores.csv]

``ALL.h5ad`` holds every cell (obs ``split`` = ``"train"`` / ``"holdout"``), as made by
:func:`fcr_tools.data.simulate_screen`. Each held-out (cell line, drug, dose) group is scored by
:func:`fcr_tools.metrics.score_heldout_groups` against the observed held-out cells and, for a
simulated screen, also against the exact counterfactual of the same control cells
(``truth="exact"`` rows), next to the control-mean and additive baselines. With FCR in the same
table, use the same ALL.h5ad (see ``benchmarks/`` for FCR's runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from fcr_tools.baselines import AdditiveBaseline, ControlMeanBaseline
from fcr_tools.metrics import score_heldout_groups


class PeerPredictions:
    """A PRED.h5ad as an object with ``predict_counterfactual`` (for score_heldout_groups)."""

    def __init__(self, path: Path):
        self.pred = ad.read_h5ad(path)
        obs = self.pred.obs
        self.keys = list(
            zip(
                obs["cell_line"].astype(str),
                obs["drug"].astype(str),
                obs["dose"].astype(float),
                strict=True,
            )
        )
        self.info = json.loads(self.pred.uns.get("peer", "{}"))

    def predict_counterfactual(self, adata: ad.AnnData, treatment: str, dose=None, **kwargs):
        lines = set(adata.obs["cell_line"].astype(str))
        if len(lines) != 1:
            raise ValueError("one cell line at a time")
        key = (lines.pop(), str(treatment), float(dose))
        rows = np.array(
            [k[0] == key[0] and k[1] == key[1] and np.isclose(k[2], key[2]) for k in self.keys]
        )
        if not rows.any():
            raise KeyError(f"no prediction for {key}")
        block = self.pred[rows]
        if not block.var_names.equals(adata.var_names):
            block = block[:, adata.var_names]
        return block.copy()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adata", required=True, type=Path)
    parser.add_argument("--pred", nargs="+", required=True, help="NAME=PRED.h5ad")
    parser.add_argument("--out", type=Path, default=None, help="CSV of all scores")
    args = parser.parse_args(argv)

    adata = ad.read_h5ad(args.adata)
    train = adata[adata.obs["split"] == "train"].copy()
    keys = dict(treatment_key="drug", covariate_keys="cell_line", dose_key="dose")
    predictors = {
        "control_mean": ControlMeanBaseline(train, **keys),
        "additive": AdditiveBaseline(train, **keys),
    }
    for item in args.pred:
        name, path = item.split("=", 1)
        predictors[name] = PeerPredictions(Path(path))

    tables = [score_heldout_groups(predictors, adata, **keys).assign(truth="observed")]
    if "fcr_simulation" in adata.uns:
        from fcr_tools.data import simulate_counterfactual

        def exact(controls, treatment, dose):
            return simulate_counterfactual(controls, treatment, dose=dose, kind="lognorm")

        tables.append(
            score_heldout_groups(predictors, adata, truth=exact, **keys).assign(truth="exact")
        )
    table = pd.concat(tables, ignore_index=True)
    cols = ["r2_all", "r2_deg20", "r2_deg50", "r2_delta", "pearson_delta_deg20"]
    summary = table.groupby(["truth", "method"], sort=False)[cols].mean().round(3)
    print(summary.to_string())
    if args.out:
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
