"""Identifiability of FCR's latent blocks on simulated screens with known ground truth.

FCR vs its ablations vs a plain conditional VAE (scVI with the conditions as covariates):
MCC of z_tx (component-wise identifiability), block R2 of z_x, z_t, z_tx (nonlinear
regression from the learned block to the true block, held-out cells), leakage (true z_t from
learned z_x and true z_x from learned z_t; near 0 when the blocks are separated), over several
seeds; then FCR and the CVAE as the number of (cell line, drug) pairs grows.

Run from the repository root:  python benchmarks/identifiability.py [--quick]
Writes benchmarks/results/identifiability.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    VARIANTS,
    add_model_arguments,
    mean_sd,
    model_flags,
    train_cvae,
    train_fcr,
    write_results,
)

from fcr_tools.data import simulate_screen
from fcr_tools.metrics import block_r2, mean_corr_coef
from fcr_tools.tl import latent_usage

BLOCKS = ("x", "t", "tx")
SETUP = {"treatment_key": "drug", "dose_key": "dose", "covariate_keys": "cell_line"}
SCORES = ["mcc_tx", "r2_x", "r2_t", "r2_tx", "leak_x_to_t", "leak_t_to_x"]
USAGE = ["active_x", "active_t", "active_tx"]
SUPERVISED = "supervised reference (shown the true latents)"

# simulate_screen's defaults, written out (also identifiability_curve.py's base screen)
SCREEN = {
    "n_cell_lines": 4,
    "n_treatments": 6,
    "doses": (0.1, 0.3, 1.0),
    "n_cells_per_condition": 50,
    "n_genes": 100,
    "n_latent_x": 4,
    "n_latent_t": 4,
    "n_latent_tx": 4,
}


def score_blocks(learned: dict[str, np.ndarray], adata) -> dict[str, float]:
    """Identifiability scores of learned blocks against the simulation's true latents."""
    true = {b: adata.obsm[f"z_{b}_true"] for b in BLOCKS}
    return {
        "mcc_tx": mean_corr_coef(learned["tx"], true["tx"]),
        "r2_x": block_r2(learned["x"], true["x"]),
        "r2_t": block_r2(learned["t"], true["t"]),
        "r2_tx": block_r2(learned["tx"], true["tx"]),
        "leak_x_to_t": block_r2(learned["x"], true["t"]),
        "leak_t_to_x": block_r2(learned["t"], true["x"]),
    }


def cvae_blocks(z: np.ndarray, adata) -> dict[str, np.ndarray]:
    """Split a CVAE latent into pseudo-blocks: the dims matched to each true block.

    Dims are assigned one to one to true components (Hungarian matching of absolute
    correlations over all blocks); a block is the dims matched to its components. MCC of
    z_tx uses the best subset of all dims, which favours the CVAE.
    """
    true = np.concatenate([adata.obsm[f"z_{b}_true"] for b in BLOCKS], axis=1)
    corr = np.abs(np.nan_to_num(np.corrcoef(true.T, z.T)[: true.shape[1], true.shape[1] :]))
    rows, cols = linear_sum_assignment(-corr)
    owner = np.repeat(np.arange(len(BLOCKS)), [adata.obsm[f"z_{b}_true"].shape[1] for b in BLOCKS])
    blocks = {b: z[:, cols[owner[rows] == i]] for i, b in enumerate(BLOCKS)}
    blocks["tx_best"] = z
    return blocks


def supervised_reference(adata, seed: int) -> dict[str, float]:
    """What a regressor that is *shown* the true latents reaches: a ceiling for the scores.

    An MLP is fitted on 70% of the cells from expression and the one-hot condition to the
    twelve true latents, and scored on the other 30%: ``mcc_tx`` is the mean correlation of
    each predicted z_tx component with the true one (no matching needed), ``r2_b`` the R2 of
    block b. No unsupervised model can be expected to do better.
    """
    from sklearn.metrics import r2_score
    from sklearn.neural_network import MLPRegressor

    expression = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    condition = adata.obs[["cell_line", "drug", "dose"]].astype(str).agg("|".join, axis=1)
    features = np.hstack([expression, pd.get_dummies(condition).to_numpy(float)])
    true = {b: adata.obsm[f"z_{b}_true"] for b in BLOCKS}
    target = np.hstack([true[b] for b in BLOCKS])
    order = np.random.default_rng(seed).permutation(adata.n_obs)
    cut = int(0.7 * len(order))
    fit, test = order[:cut], order[cut:]
    regressor = MLPRegressor(
        hidden_layer_sizes=(256, 256), max_iter=300, early_stopping=True, random_state=seed
    )
    predicted = regressor.fit(features[fit], target[fit]).predict(features[test])
    ends = np.cumsum([true[b].shape[1] for b in BLOCKS])
    parts = dict(zip(BLOCKS, np.split(predicted, ends[:-1], axis=1), strict=True))
    scores = {
        f"r2_{b}": r2_score(true[b][test], parts[b], multioutput="variance_weighted")
        for b in BLOCKS
    }
    corr = [
        np.corrcoef(parts["tx"][:, j], true["tx"][test, j])[0, 1]
        for j in range(true["tx"].shape[1])
    ]
    scores["mcc_tx"] = float(np.mean(corr))
    return scores


def run_one(
    screen: dict, seed: int, variant: str, epochs: int, model_kwargs=None, plan_kwargs=None
) -> dict:
    adata = simulate_screen(**screen, seed=seed)
    dims = {f"n_latent_{b}": screen[f"n_latent_{b}"] for b in BLOCKS}
    if variant == SUPERVISED:
        start = time.perf_counter()
        scores = supervised_reference(adata, seed)
        seconds = time.perf_counter() - start
    elif variant == "plain CVAE (scVI)":
        model, seconds = train_cvae(
            adata, ["cell_line", "condition"], sum(dims.values()), epochs, seed
        )
        blocks = cvae_blocks(model.get_latent_representation(), adata)
        scores = score_blocks(blocks, adata)
        scores["mcc_tx"] = mean_corr_coef(blocks["tx_best"], adata.obsm["z_tx_true"])
    else:
        kwargs = {**dims, **(model_kwargs or {})}
        plan = {**(plan_kwargs or {}), **VARIANTS[variant]}
        model, seconds = train_fcr(adata, SETUP, kwargs, plan, epochs, seed, shrinkage=False)
        blocks = {b: model.get_latent_representation(block=b) for b in BLOCKS}
        scores = score_blocks(blocks, adata)
        # dimensions in use (KL from the prior > 0.1 nats); the true blocks have 4 each
        usage = latent_usage(model).groupby("block")["active"].sum()
        scores.update({f"active_{b}": int(usage[b]) for b in BLOCKS})
    n_pairs = screen["n_cell_lines"] * screen["n_treatments"]
    return {"method": variant, "seed": seed, "n_pairs": n_pairs, "seconds": seconds, **scores}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument(
        "--methods", default=None, help="comma-separated subset of the methods (default all)"
    )
    parser.add_argument("--no-growth", action="store_true", help="skip the growing screens")
    add_model_arguments(parser, "identifiability")
    args = parser.parse_args(argv)

    screen = dict(SCREEN)
    sizes = [(2, 3), (3, 4), (4, 6), (6, 8)]
    seeds, epochs = range(args.seeds), args.epochs
    if args.quick:
        screen.update(n_cell_lines=2, n_treatments=3, n_cells_per_condition=15, n_genes=40)
        sizes, seeds, epochs = [(2, 2), (2, 3)], range(2), 3

    methods = [*VARIANTS, "plain CVAE (scVI)", SUPERVISED]
    if args.methods:
        known = methods
        methods = [m.strip() for m in args.methods.split(",")]
        unknown = sorted(set(methods) - set(known))
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {known}")
    if args.no_growth:
        sizes = []
    rows = []
    for seed in seeds:
        for method in methods:
            rows.append(run_one(screen, seed, method, epochs, args.model_kwargs, args.plan_kwargs))
            print(pd.DataFrame(rows[-1:]).round(3).to_string(header=False), flush=True)
    by_seed = pd.DataFrame(rows)

    growth = []
    for n_lines, n_drugs in sizes:
        size_screen = {**screen, "n_cell_lines": n_lines, "n_treatments": n_drugs}
        for method in ["FCR", "plain CVAE (scVI)"]:
            growth.append(
                run_one(size_screen, 0, method, epochs, args.model_kwargs, args.plan_kwargs)
            )
            print(pd.DataFrame(growth[-1:]).round(3).to_string(header=False), flush=True)
    growth = pd.DataFrame(growth)

    usage = [c for c in USAGE if c in by_seed]
    summary = mean_sd(by_seed, ["method"], SCORES + usage)
    command = "python benchmarks/identifiability.py" + (" --quick" if args.quick else "")
    if args.methods:
        command += f" --methods '{args.methods}'"
    command += " --no-growth" * args.no_growth + model_flags(args, "identifiability")
    tables = {
        "summary_mean_±_sd_over_seeds": summary,
        "per_seed": by_seed.round(4),
    }
    if len(growth):
        tables["as_the_number_of_pairs_grows_(seed_0)"] = growth.round(4)
    write_results(
        args.name + ("_quick" if args.quick else ""),
        command,
        {
            "title": "Identifiability on simulated screens",
            "description": (
                f"Screen: {screen} (simulate_screen defaults), {epochs} epochs, FCR model "
                f"arguments {args.model_kwargs or 'default'}, training-plan arguments "
                f"{args.plan_kwargs or 'default'}, latent sizes "
                "equal to the true ones (4 / 4 / 4; the CVAE has one 12-dim latent). "
                "mcc_tx: MCC of learned vs true z_tx (CVAE: best 4 of its 12 dims). "
                "r2_b: kNN-regression R2 from the learned block to the true block on "
                "held-out cells. leak_x_to_t: R2 of true z_t from learned z_x (and "
                "leak_t_to_x the reverse): 0 means no leakage. CVAE blocks: its dims matched "
                "one to one to the true components of each block. active_b (FCR): "
                "dimensions of learned block b whose posterior differs from its prior (KL > "
                "0.1 nats, fcr_tools.tl.latent_usage); each true block has 4."
            ),
        },
        tables,
    )


if __name__ == "__main__":
    main()
