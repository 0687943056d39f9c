"""Shared pieces of the benchmark scripts: training, result files, tables."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch

from fcr_tools._objective import LOSS_TERMS

RESULTS = Path(__file__).resolve().parent / "results"

# every auxiliary term of the objective off: the ELBO of the cells and their control partners
NO_AUX = {
    t.weight: 0.0
    for t in LOSS_TERMS
    if t.weight not in ("reconstruction_weight", "control_weight")
}

# FCR and its ablations, as plan_kwargs
VARIANTS = {
    "FCR": {},
    "FCR without discriminators": {"adversarial_weight": 0.0},
    "FCR without classifiers / similarity": {
        "covariate_classifier_weight": 0.0,
        "treatment_classifier_weight": 0.0,
        "similarity_weight": 0.0,
    },
    "FCR blocks, ELBO only": NO_AUX,
}


def add_model_arguments(parser, name: str) -> None:
    """``--model-kwargs`` / ``--plan-kwargs`` (FCRModel / training-plan arguments as JSON) and
    ``--name`` (result file name)."""
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help='FCRModel arguments as JSON, e.g. \'{"interaction_prior": "mlp"}\'',
    )
    parser.add_argument(
        "--plan-kwargs",
        type=json.loads,
        default={},
        help="FCRTrainingPlan arguments as JSON, e.g. '{\"aggregate_kl_weight\": 5}'",
    )
    parser.add_argument("--name", default=name, help=f"result file name (default {name})")


def model_flags(args, name: str) -> str:
    """The command-line flags of :func:`add_model_arguments` that differ from the defaults."""
    flags = f" --model-kwargs '{json.dumps(args.model_kwargs)}'" if args.model_kwargs else ""
    flags += f" --plan-kwargs '{json.dumps(args.plan_kwargs)}'" if args.plan_kwargs else ""
    return flags + (f" --name {args.name}" if args.name != name else "")


def environment() -> dict:
    """Versions and machine facts recorded with every result."""
    import fcr_tools

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "scvi-tools": scvi.__version__,
        "fcr_tools": fcr_tools.__version__,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def train_fcr(
    adata,
    setup: dict,
    model_kwargs: dict,
    plan_kwargs: dict,
    epochs: int,
    seed: int,
    shrinkage: bool = True,
):
    """Set up, build and train an FCRModel; returns the model and training seconds.

    ``shrinkage`` is ``FCRModel.train``'s (default on: a second training chooses how far
    predictions of unmeasured pairs shrink towards the context-adjusted additive baseline);
    benchmarks of the latents or of speed turn it off.
    """
    from fcr_tools import FCRModel

    scvi.settings.seed = seed
    FCRModel.setup_anndata(adata, **setup)
    model = FCRModel(adata, **model_kwargs)
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        enable_progress_bar=False,
        plan_kwargs=plan_kwargs,
        shrinkage=shrinkage,
    )
    return model, time.perf_counter() - start


def train_cvae(adata, covariates: list[str], n_latent: int, epochs: int, seed: int):
    """A plain conditional VAE: scVI with the conditions as categorical covariates.

    One latent block with a standard normal prior; the decoder sees the covariates. Gaussian
    likelihood on log-normalised X, like FCR's default.
    """
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata, categorical_covariate_keys=covariates)
    model = scvi.model.SCVI(adata, n_latent=n_latent, gene_likelihood="normal")
    start = time.perf_counter()
    model.train(max_epochs=epochs, enable_progress_bar=False)
    return model, time.perf_counter() - start


def write_results(name: str, command: str, payload: dict, tables: dict[str, pd.DataFrame]):
    """Write ``results/<name>.json`` and ``results/<name>.md`` (tables as Markdown)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "environment": environment(), **payload}
    for key, table in tables.items():
        payload[key] = table.to_dict(orient="records")
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=_jsonable))
    lines = [f"# {payload.get('title', name)}", "", f"Command: `{command}`", ""]
    if payload.get("description"):
        lines += [payload["description"], ""]
    env = payload["environment"]
    lines += [
        f"Environment: Python {env['python']}, torch {env['torch']}, scvi-tools "
        f"{env['scvi-tools']}, fcr_tools {env['fcr_tools']}, {env['machine']}, "
        f"{env['cpu_threads']} CPU threads, GPU: {env['cuda'] or 'none'}.",
        "",
    ]
    for key, table in tables.items():
        lines += [f"## {key.replace('_', ' ')}", "", markdown_table(table), ""]
    if payload.get("notes"):
        lines += ["## Notes", "", *payload["notes"], ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a GitHub Markdown table."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = []
        for v in row:
            if isinstance(v, float | np.floating):
                cells.append("nan" if np.isnan(v) else f"{v:.{digits}f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_sd(df: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    """Mean and standard deviation over seeds, formatted as "mean ± sd"."""
    grouped = df.groupby(by, sort=False)[columns]
    mean, sd = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    out = mean.copy().astype(object)
    for c in columns:
        out[c] = [
            "n/a" if np.isnan(m) else f"{m:.3f} ± {s:.3f}"
            for m, s in zip(mean[c], sd[c], strict=True)
        ]
    out["n_seeds"] = grouped.size()
    return out.reset_index()


def _jsonable(value):
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
