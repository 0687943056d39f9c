"""Semi-real check: real PBMC expression with simulated, cell-type-specific drug effects.

scanpy ships ``pbmc68k_reduced`` (700 PBMCs, 765 genes, log-normalised in ``.raw``). The five
largest cell types are the contexts; their real cells are the controls. Six simulated drugs at
two doses act on each cell multiplicatively (on the normalised scale, so zeros stay zero):
``y' = log1p(expm1(y) * exp(h(d) * (main_t + interaction_{t,c})))`` with a sparse main effect
per drug and a low-rank cell type x drug interaction (cell-type factors times drug factors times
gene programs), so that real expression structure, sparsity and noise are in play. Treated
cells are real cells of the type with the effect applied. Three (cell type, drug) pairs are
held out and predicted from the type's controls by FCR and the baselines.

Run from the repository root:  python benchmarks/semireal.py [--quick] [--seeds 3]
Writes benchmarks/results/semireal.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_model_arguments, mean_sd, model_flags, train_fcr, write_results

from fcr_tools.baselines import AdditiveBaseline, ControlMeanBaseline
from fcr_tools.metrics import cluster_scores, score_heldout_groups

SCORES = ["r2_all", "r2_deg20", "r2_deg50", "r2_delta", "pearson_delta_deg20"]
SETUP = {"treatment_key": "drug", "dose_key": "dose", "covariate_keys": "cell_type"}


def make_screen(
    seed: int,
    n_types: int = 5,
    n_drugs: int = 6,
    doses=(0.3, 1.0),
    cells_per_group: int = 50,
    n_holdout: int = 3,
    rank: int = 2,
    program_size: int = 40,
) -> ad.AnnData:
    """Real PBMCs as controls plus simulated treated cells (see the module docstring)."""
    rng = np.random.default_rng(seed)
    base = sc.datasets.pbmc68k_reduced().raw.to_adata()
    x = base.X.toarray() if sparse.issparse(base.X) else np.asarray(base.X)
    labels = base.obs["bulk_labels"].astype(str).to_numpy()
    types = pd.Series(labels).value_counts().index[:n_types].tolist()
    n_genes = x.shape[1]

    def program():
        v = np.zeros(n_genes)
        genes = rng.choice(n_genes, program_size, replace=False)
        v[genes] = rng.normal(0, 1, program_size)
        return v

    main = np.stack([1.5 * program() for _ in range(n_drugs)])
    programs = np.stack([program() for _ in range(rank)])
    type_factor = rng.normal(0, 1, (n_types, rank))
    drug_factor = rng.normal(0, 1, (n_drugs, rank))
    ec50 = np.exp(rng.uniform(np.log(0.1), np.log(1.0), n_drugs))
    drugs = [f"drug_{k}" for k in range(n_drugs)]

    blocks, obs = [], []
    for c, cell_type in enumerate(types):
        cells = np.flatnonzero(labels == cell_type)
        blocks.append(x[cells])
        obs.append(
            pd.DataFrame(
                {"cell_type": cell_type, "drug": "control", "dose": 0.0}, index=range(len(cells))
            )
        )
        for k, drug in enumerate(drugs):
            interaction = (type_factor[c] * drug_factor[k]) @ programs
            for dose in doses:
                h = dose / (dose + ec50[k])
                chosen = rng.choice(cells, cells_per_group, replace=len(cells) < cells_per_group)
                effect = h * (main[k] + interaction)
                blocks.append(np.log1p(np.expm1(x[chosen]) * np.exp(effect)))
                obs.append(
                    pd.DataFrame(
                        {"cell_type": cell_type, "drug": drug, "dose": dose},
                        index=range(cells_per_group),
                    )
                )
    obs = pd.concat(obs, ignore_index=True)
    obs.index = [f"cell_{i}" for i in range(len(obs))]
    adata = ad.AnnData(np.concatenate(blocks).astype(np.float32), obs=obs, var=base.var[[]])
    for key in ["cell_type", "drug"]:
        adata.obs[key] = adata.obs[key].astype("category")
    pairs = [(t, d) for t in types for d in drugs]
    held = set()
    for i in rng.permutation(len(pairs)):
        t, d = pairs[i]
        if len(held) == n_holdout:
            break
        if sum(p[0] == t for p in held) < 1 and sum(p[1] == d for p in held) < 1:
            held.add((t, d))
    key = adata.obs["cell_type"].astype(str) + "|" + adata.obs["drug"].astype(str)
    adata.obs["split"] = np.where(key.isin({f"{t}|{d}" for t, d in held}), "holdout", "train")
    return adata


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=200)
    add_model_arguments(parser, "semireal")
    args = parser.parse_args(argv)
    seeds, epochs = range(args.seeds), args.epochs
    if args.quick:
        seeds, epochs = range(1), 3

    tables, latent_rows = [], []
    for seed in seeds:
        adata = make_screen(seed)
        train = adata[adata.obs["split"] == "train"].copy()
        model, _ = train_fcr(
            train.copy(), SETUP, args.model_kwargs, args.plan_kwargs, epochs, seed
        )
        predictors = {
            "FCR": model,
            "additive": AdditiveBaseline(train, "drug", "cell_type", dose_key="dose"),
            "control mean": ControlMeanBaseline(train, "drug", "cell_type", dose_key="dose"),
        }
        table = score_heldout_groups(predictors, adata, "drug", "cell_type", dose_key="dose")
        table["seed"] = seed
        tables.append(table)
        print(table.groupby("method")[SCORES].mean().round(3), flush=True)
        treated = train.obs["drug"].astype(str) != "control"
        labels = {
            "cell type": train.obs["cell_type"].astype(str).to_numpy(),
            "drug (treated cells)": train.obs["drug"].astype(str).to_numpy(),
        }
        for block in ("x", "t", "tx"):
            z = model.get_latent_representation(train, block=block)
            for name, lab in labels.items():
                mask = treated.to_numpy() if name.startswith("drug") else slice(None)
                scores = cluster_scores(z[mask], lab[mask], seed=seed)
                latent_rows.append({"seed": seed, "block": f"z_{block}", "labels": name, **scores})
    groups = pd.concat(tables, ignore_index=True)
    per_seed = groups.groupby(["method", "seed"], sort=False)[SCORES].mean().reset_index()
    summary = mean_sd(per_seed, ["method"], SCORES)
    latent = mean_sd(pd.DataFrame(latent_rows), ["block", "labels"], ["nmi", "ari", "silhouette"])
    write_results(
        args.name + ("_quick" if args.quick else ""),
        "python benchmarks/semireal.py" + " --quick" * args.quick + model_flags(args, "semireal"),
        {
            "title": "Semi-real check: PBMCs with simulated cell-type-specific drug effects",
            "description": (
                "Contexts: the 5 largest cell types of scanpy's pbmc68k_reduced (real cells "
                "as controls); 6 simulated drugs x 2 doses with main effects and a rank-2 "
                "cell type x drug interaction; 3 (cell type, drug) pairs held out. FCR with "
                f"{args.model_kwargs or 'default settings'} (training plan: "
                f"{args.plan_kwargs or 'default'}), {epochs} epochs. Latent scores: "
                "k-means clusters of each "
                "block (training cells; drugs on treated cells) vs the labels."
            ),
        },
        {
            "held-out_prediction_(mean_±_sd_over_seeds)": summary,
            "latent_structure_(mean_±_sd_over_seeds)": latent,
            "per_group": groups.round(4),
        },
    )


if __name__ == "__main__":
    main()
