"""The demo: FCR end to end on a simulated screen with known ground truth."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import scvi

from ._model import FCRModel
from ._shrinkage import target_name
from .baselines import AdditiveBaseline, ContextAdjustedBaseline, ControlMeanBaseline
from .data import simulate_counterfactual, simulate_screen
from .metrics import mean_corr_coef, score_heldout_groups
from .pl import latent_umaps
from .tl import block_umap

SCORE_COLUMNS = ["r2_all", "r2_deg20", "r2_deg50", "r2_delta", "pearson_delta_deg20"]

DEMO_SETTINGS = {
    "full": {
        "screen": dict(
            n_cell_lines=4,
            n_treatments=6,
            doses=(0.1, 0.3, 1.0),
            n_cells_per_condition=60,
            n_genes=200,
            n_latent_x=4,
            n_latent_t=4,
            n_latent_tx=4,
            n_holdout_pairs=4,
        ),
        "model": dict(n_latent_x=8, n_latent_t=8, n_latent_tx=8),
        "max_epochs": 45,  # x2: train() also trains the model that chooses the shrinkage
        "min_cells": 30,
        "umap_maxiter": 150,
    },
    "quick": {
        "screen": dict(
            n_cell_lines=3,
            n_treatments=4,
            doses=(0.3, 1.0),
            n_cells_per_condition=40,
            n_genes=60,
            n_latent_x=3,
            n_latent_t=3,
            n_latent_tx=3,
            n_holdout_pairs=2,
        ),
        "model": dict(n_latent_x=4, n_latent_t=4, n_latent_tx=4, n_hidden=64),
        "max_epochs": 20,
        "min_cells": 30,
        "umap_maxiter": 100,
    },
}


def _markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path,
    quick: bool = False,
    max_epochs: int | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    progress_bar: bool = True,
) -> dict:
    """Simulate a screen, train FCR, write latents, plot them and score counterfactuals.

    Writes into ``out_dir``: ``umap_latents.png`` (a UMAP per block, coloured by cell line
    and by drug), ``counterfactuals.csv`` (every held-out group scored for FCR and the
    baselines), ``report.json`` and ``report.md`` (summary), ``latents.h5ad`` (the cells with
    their three blocks in obsm) and ``model/`` (the saved model).

    Parameters
    ----------
    out_dir
        Output directory (created).
    quick
        A small screen and few epochs, for smoke tests.
    max_epochs
        Override the number of training epochs.
    seed
        Seed of the simulation and of training (``scvi.settings.seed``).
    accelerator
        Lightning accelerator.
    progress_bar
        Show the training progress bar.

    Returns
    -------
    The report as a dict.

    Examples
    --------
    >>> report = run_demo("demo_out", quick=True)  # doctest: +SKIP
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = DEMO_SETTINGS["quick" if quick else "full"]
    epochs = settings["max_epochs"] if max_epochs is None else max_epochs
    scvi.settings.seed = seed

    adata = simulate_screen(**settings["screen"], seed=seed)
    train = adata[adata.obs["split"] == "train"].copy()
    FCRModel.setup_anndata(
        train, treatment_key="drug", dose_key="dose", covariate_keys="cell_line"
    )
    model = FCRModel(train, **settings["model"])
    t0 = time.perf_counter()
    model.train(max_epochs=epochs, accelerator=accelerator, enable_progress_bar=progress_bar)
    train_seconds = time.perf_counter() - t0

    # latents of every cell, held-out pairs included
    model.write_latents(adata)
    block_umap(adata, maxiter=settings["umap_maxiter"])
    latent_umaps(adata, color=["cell_line", "drug"], save=str(out / "umap_latents.png"))
    mcc = {
        block: mean_corr_coef(adata.obsm[f"X_fcr_{block}"], adata.obsm[f"z_{block}_true"])
        for block in ("x", "t", "tx")
    }
    axes = model.interaction_axes_
    if axes is not None:  # z_tx in the module's own axes: undo the reported rotation
        own = adata.obsm["X_fcr_tx"] @ axes["rotation"]
        mcc["tx_module_axes"] = mean_corr_coef(own, adata.obsm["z_tx_true"])

    def exact_truth(controls, treatment, dose):
        return simulate_counterfactual(controls, treatment, dose, kind="lognorm", seed=seed)

    additive = AdditiveBaseline(train, "drug", "cell_line", dose_key="dose")
    predictors = {
        "FCR": model,  # unmeasured pairs shrunk towards a baseline (the default)
        "FCR without shrinkage": _Unshrunk(model),
        "additive": additive,
        "context-adjusted": ContextAdjustedBaseline.from_group_means(additive._means),
        "control_mean": ControlMeanBaseline(train, "drug", "cell_line", dose_key="dose"),
    }
    scores = score_heldout_groups(
        predictors,
        adata,
        treatment_key="drug",
        covariate_keys="cell_line",
        dose_key="dose",
        min_cells=settings["min_cells"],
        truth=exact_truth,
    )
    scores.to_csv(out / "counterfactuals.csv", index=False)
    summary = scores.groupby("method", sort=False)[SCORE_COLUMNS].mean()

    model.save(str(out / "model"), overwrite=True)
    adata.write_h5ad(out / "latents.h5ad")
    history = model.history
    report = {
        "data": {
            "n_cells": int(adata.n_obs),
            "n_genes": int(adata.n_vars),
            "n_train_cells": int(train.n_obs),
            "holdout_pairs": [str(p) for p in adata.uns["fcr_simulation"]["holdout_pairs"]],
            "n_heldout_groups_scored": int(scores.loc[scores.method == "FCR"].shape[0]),
        },
        "training": {
            "epochs": int(epochs),
            "seconds": round(train_seconds, 1),
            "shrinkage_weight": _weight(model),
            "shrinkage_pairs": (model.shrinkage_ or {}).get("pairs"),
            "shrinkage_target": target_name(model.shrinkage_ or {}),
            "final_train_loss": float(history["train_loss"].iloc[-1, 0]),
            "final_validation_loss": float(history["validation_loss"].iloc[-1, 0]),
        },
        "latents": {
            "obsm_keys": [f"X_fcr_{b}" for b in ("x", "t", "tx")],
            "dims": {b: int(adata.obsm[f"X_fcr_{b}"].shape[1]) for b in ("x", "t", "tx")},
            "mcc_vs_truth": {b: round(v, 3) for b, v in mcc.items()},
            "z_tx_total_correlation": None
            if axes is None
            else [round(axes[k], 4) for k in ("total_correlation", "total_correlation_aligned")],
            "umap_obsm_keys": [f"X_umap_fcr_{b}" for b in ("x", "t", "tx")],
            "umap_figure": "umap_latents.png",
        },
        "counterfactuals": {
            "truth": "exact simulated counterfactual of the held-out pairs' control cells",
            "mean_scores": {
                method: {k: round(float(v), 4) for k, v in row.items()}
                for method, row in summary.iterrows()
            },
            "table": "counterfactuals.csv",
        },
        "model_dir": "model",
        "wall_seconds": round(time.perf_counter() - start, 1),
        "fcr_beats_control_mean_on_deg20": bool(
            summary.loc["FCR", "r2_deg20"] > summary.loc["control_mean", "r2_deg20"]
        ),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_report_markdown(report, summary))
    return report


class _Unshrunk:
    """The model's own predictions, without the shrinkage of unmeasured pairs."""

    def __init__(self, model):
        self.model = model

    def predict_counterfactual(self, adata, treatment, dose=None, **kwargs):
        return self.model.predict_counterfactual(
            adata, treatment=treatment, dose=dose, shrinkage=False, **kwargs
        )


def _weight(model) -> float | None:
    return None if model.shrinkage_ is None else round(float(model.shrinkage_["weight"]), 3)


def _shrinkage_line(training: dict) -> str:
    w = training["shrinkage_weight"]
    if w is None:
        return "No shrinkage weight was chosen: FCR predicts unmeasured pairs alone."
    pairs = ", ".join("|".join(p) for p in training["shrinkage_pairs"])
    return (
        f"Unmeasured pairs are predicted as {w:.2f} x FCR + {1 - w:.2f} x "
        f"{training['shrinkage_target']}; "
        f"the weight was chosen on the measured pairs {pairs}, held out inside the training "
        "data (row *FCR*; *FCR without shrinkage* is the model alone)."
    )


def _axes_line(latents: dict) -> str:
    """How z_tx's axes were aligned after training (model.align_interaction_axes)."""
    tc = latents["z_tx_total_correlation"]
    if tc is None:
        return "z_tx is in the module's own axes (not aligned)."
    own = latents["mcc_vs_truth"]["tx_module_axes"]
    return (
        f"z_tx is written in its aligned axes: the rotation that brings the total correlation "
        f"within conditions from {tc[0]:.4f} to {tc[1]:.4f} nats per cell "
        f"(MCC of z_tx in the module's own axes: {own:.3f})."
    )


def _report_markdown(report: dict, summary: pd.DataFrame) -> str:
    data, training, latents = report["data"], report["training"], report["latents"]
    mcc = latents["mcc_vs_truth"]
    return "\n".join(
        [
            "# fcr_tools demo report",
            "",
            f"Simulated screen: {data['n_cells']} cells x {data['n_genes']} genes; "
            f"{data['n_train_cells']} training cells; held-out (cell line, drug) pairs: "
            f"{', '.join(data['holdout_pairs'])}.",
            "",
            f"Training: {training['epochs']} epochs in {training['seconds']} s (with the "
            "second training that chooses the shrinkage of unmeasured pairs); final "
            f"validation loss {training['final_validation_loss']:.2f}.",
            "",
            _shrinkage_line(training),
            "",
            "## Latent blocks",
            "",
            f"Written to `adata.obsm`: {', '.join(latents['obsm_keys'])} "
            f"(dims {latents['dims']}); their UMAPs: {', '.join(latents['umap_obsm_keys'])}, "
            f"drawn in `{latents['umap_figure']}`.",
            "",
            f"MCC against the true latents: z_x {mcc['x']:.3f}, z_t {mcc['t']:.3f}, "
            f"z_tx {mcc['tx']:.3f}.",
            "",
            _axes_line(latents),
            "",
            "## Counterfactual prediction of held-out pairs",
            "",
            f"{data['n_heldout_groups_scored']} held-out (cell line, drug, dose) groups; truth: "
            f"{report['counterfactuals']['truth']}. Mean over groups:",
            "",
            _markdown_table(summary.reset_index()),
            "",
            f"Total wall time: {report['wall_seconds']} s.",
            "",
        ]
    )


def format_summary(report: dict) -> str:
    """One-paragraph console summary of a demo report."""
    scores = report["counterfactuals"]["mean_scores"]
    parts = [f"{m}: R2 top-20 DEGs {s['r2_deg20']:.3f}" for m, s in scores.items()]
    return (
        f"Demo finished in {report['wall_seconds']} s. Held-out pairs - " + "; ".join(parts) + "."
    )


__all__ = ["DEMO_SETTINGS", "format_summary", "run_demo"]
