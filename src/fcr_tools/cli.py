"""The ``fcr-tools`` command line: ``train``, ``predict`` and ``demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


class CLIError(Exception):
    """A user error reported as one line, with exit status 2."""


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _split_keys(values: Sequence[str] | None) -> list[str]:
    """``--covariate-keys a,b --covariate-keys c`` -> ``["a", "b", "c"]``."""
    keys = []
    for value in values or []:
        keys += [part.strip() for part in value.split(",") if part.strip()]
    return keys


def _existing_file(path: str, flag: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"{flag} {path}: no such file.")
    return file


def _read_data(path: str, flag: str = "--adata"):
    """Read an .h5ad (AnnData) or .h5mu (MuData) file."""
    file = _existing_file(path, flag)
    _info(f"Reading {path}")
    suffix = file.suffix.lower()
    if suffix == ".h5ad":
        import anndata as ad

        return ad.read_h5ad(file)
    if suffix == ".h5mu":
        import mudata

        return mudata.read_h5mu(file)
    raise CLIError(f"{flag} {path}: expected an .h5ad or .h5mu file.")


def _obs_column(data, column: str):
    """An obs column of an AnnData, or of a MuData (global obs, else a modality's obs)."""
    if column in data.obs.columns:
        return data.obs[column]
    for modality in getattr(data, "mod", {}).values():
        if column in modality.obs.columns:  # cells absent from the modality: no match
            return modality.obs[column].reindex(data.obs_names)
    return None


def _obs_filter(adata, filters: Sequence[str] | None):
    """Boolean mask of the cells matching every ``COLUMN=VALUE`` filter."""
    import numpy as np

    mask = np.ones(adata.n_obs, dtype=bool)
    for item in filters or []:
        column, sep, value = item.partition("=")
        column = column.strip()
        if not sep or not column:
            raise CLIError(f"--obs-filter {item!r}: expected COLUMN=VALUE.")
        values = _obs_column(adata, column)
        if values is None:
            raise CLIError(
                f"--obs-filter {item!r}: column {column!r} not found in obs "
                f"({', '.join(map(str, adata.obs.columns[:15]))})."
            )
        mask &= (values.astype(str) == value.strip()).to_numpy()
    if not mask.any():
        raise CLIError(f"--obs-filter {' '.join(filters or [])}: no cell matches.")
    return mask


def _mudata_modalities(mdata, modality: str, keys: list[str]) -> dict[str, str | None]:
    """Read the obs columns from the expression modality, or else from the global obs."""
    if modality not in mdata.mod:
        raise CLIError(
            f"--rna-modality {modality!r}: not found in the MuData (modalities: "
            f"{', '.join(mdata.mod)})."
        )
    in_modality = set(mdata.mod[modality].obs.columns)
    where = modality if all(k in in_modality for k in keys) else None
    return {
        "rna_layer": modality,
        "treatment_key": where,
        "dose_key": where,
        "covariate_keys": where,
    }


# ------------------------------------------------------------------ train
def _train(args: argparse.Namespace) -> int:
    out_model = Path(args.out_model)
    if out_model.exists() and not out_model.is_dir():
        raise CLIError(
            f"--out-model {out_model}: is a file; the model is saved as a folder, give a "
            "folder name."
        )
    if out_model.exists() and any(out_model.iterdir()) and not args.overwrite:
        raise CLIError(f"--out-model {out_model}: exists and is not empty; add --overwrite.")
    out_suffix = Path(args.out_adata).suffix.lower() if args.out_adata else None
    if out_suffix not in (None, ".h5ad", ".h5mu"):
        raise CLIError(f"--out-adata {args.out_adata}: expected an .h5ad or .h5mu file name.")
    covariates = _split_keys(args.covariate_keys)
    data = _read_data(args.adata)
    if out_suffix == ".h5mu" and not hasattr(data, "mod"):
        raise CLIError(
            f"--out-adata {args.out_adata}: the input {args.adata} is an AnnData, and an .h5mu "
            "file holds a MuData; name the output .h5ad."
        )

    import scvi

    from ._model import FCRModel
    from ._shrinkage import target_name

    scvi.settings.seed = args.seed
    is_mudata = hasattr(data, "mod")
    setup = {
        "treatment_key": args.treatment_key,
        "control_treatment": args.control,
        "covariate_keys": covariates or None,
        "dose_key": args.dose_key,
    }
    if is_mudata:
        keys = [args.treatment_key, *covariates] + ([args.dose_key] if args.dose_key else [])
        modalities = _mudata_modalities(data, args.rna_modality, keys)
        FCRModel.setup_mudata(data, rna_layer=args.layer, modalities=modalities, **setup)
    else:
        FCRModel.setup_anndata(data, layer=args.layer, **setup)
    model = FCRModel(
        data,
        n_latent_x=args.n_latent,
        n_latent_t=args.n_latent,
        n_latent_tx=args.n_latent,
        n_hidden=args.n_hidden,
        likelihood=args.likelihood,
    )
    _info(f"{model.summary}\nTraining on {data.n_obs} cells.")
    model.train(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        enable_progress_bar=not args.no_progress,
        shrinkage=not args.no_shrinkage,
    )
    if model.shrinkage_:
        w, target = model.shrinkage_["weight"], target_name(model.shrinkage_)
        _info(f"Unmeasured pairs will be predicted as {w:.2f} x FCR + {1 - w:.2f} x {target}.")
    model.save(str(out_model), overwrite=True)
    _info(f"Saved the model to {out_model}/")
    if args.out_adata:
        _write_latents(model, data, args.out_adata, args.rna_modality if is_mudata else None)
        _info(f"Wrote the cells with their latents (obsm X_fcr_*) to {args.out_adata}")
    return 0


def _write_latents(model, data, out: str, modality: str | None) -> None:
    import numpy as np

    model.write_latents(data)
    if modality is None or out.lower().endswith(".h5mu"):
        data.write(out)
        return
    # an .h5ad from a MuData: the expression modality, with the latents of its cells
    rna = data.mod[modality].copy()
    rows = data.obs_names.get_indexer(rna.obs_names)
    if (rows < 0).any():
        raise CLIError(f"Cells of modality {modality!r} are missing from the MuData's obs.")
    for key in ("X_fcr_x", "X_fcr_t", "X_fcr_tx"):
        rna.obsm[key] = np.asarray(data.obsm[key])[rows]
    rna.write_h5ad(out)


# ------------------------------------------------------------------ predict
def _predict(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    if not (model_dir / "model.pt").is_file():
        raise CLIError(f"--model {args.model}: not a saved FCR model (no model.pt).")
    if Path(args.out).suffix.lower() != ".h5ad":
        raise CLIError(f"--out {args.out}: expected an .h5ad file name.")
    data = _read_data(args.adata)
    mask = _obs_filter(data, args.obs_filter)

    import scvi

    from ._model import FCRModel
    from ._registration import RegisteredSetup

    scvi.settings.seed = args.seed  # the draws of --mode sample
    model = FCRModel.load(str(model_dir), accelerator=args.accelerator)
    from_mudata = RegisteredSetup.from_registry(model.registry_).is_mudata
    if from_mudata != hasattr(data, "mod"):
        wanted = (
            "an .h5mu file with its expression modality"
            if from_mudata
            else "an .h5ad file (the expression modality of an .h5mu, saved as .h5ad)"
        )
        raise CLIError(
            f"--adata {args.adata}: the model at {args.model} was trained from an "
            f"{'.h5mu (MuData)' if from_mudata else '.h5ad (AnnData)'}; pass {wanted}."
        )
    cells = data[mask].copy()
    _info(
        f"Predicting {cells.n_obs} cells under {args.treatment!r}"
        + (f" at dose {args.dose}" if args.dose is not None else "")
        + f" ({args.mode} mode)."
    )
    pred = model.predict_counterfactual(
        cells, treatment=args.treatment, dose=args.dose, mode=args.mode
    )
    pred.write_h5ad(args.out)
    _info(f"Wrote {pred.n_obs} predicted cells x {pred.n_vars} genes to {args.out}")
    return 0


def _dose(value: str):
    """A dose: a number, or ``"d1+d2"`` for combinations."""
    try:
        return float(value)
    except ValueError:
        return value


# ------------------------------------------------------------------ demo
def _demo(args: argparse.Namespace) -> int:
    from ._demo import format_summary, run_demo

    report = run_demo(
        args.out,
        quick=args.quick,
        max_epochs=args.epochs,
        seed=args.seed,
        accelerator=args.accelerator,
        progress_bar=not args.no_progress,
    )
    print(format_summary(report))
    print(f"Report: {args.out}/report.md (and report.json, umap_latents.png, model/).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fcr-tools``.

    Examples
    --------
    >>> from fcr_tools.cli import build_parser
    >>> args = build_parser().parse_args(["demo", "--out", "demo_out", "--quick"])
    >>> args.command, args.quick
    ('demo', True)
    """
    parser = argparse.ArgumentParser(
        prog="fcr-tools",
        description="FCR: factorized causal representations of single-cell perturbation "
        "responses.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train FCR on an .h5ad / .h5mu file; save the model and the latents",
        description="Register a data set (columns given as flags), train FCR on it, save the "
        "model to a folder and, optionally, the cells with their three latent blocks "
        "(obsm X_fcr_x, X_fcr_t, X_fcr_tx).",
        epilog="Example: fcr-tools train --adata screen.h5ad --treatment-key drug "
        "--covariate-keys cell_line --dose-key dose --out-model fcr_model "
        "--out-adata latents.h5ad",
    )
    train.add_argument("--adata", required=True, help="input .h5ad (AnnData) or .h5mu (MuData)")
    train.add_argument("--treatment-key", required=True, help="obs column of the treatments")
    train.add_argument("--control", default="control", help="control label (default: control)")
    train.add_argument(
        "--covariate-keys",
        action="append",
        metavar="KEYS",
        help="obs column(s) of the context, comma-separated or repeated",
    )
    train.add_argument("--dose-key", default=None, help="numeric obs column of the doses")
    train.add_argument("--layer", default=None, help="layer with the expression (default X)")
    train.add_argument(
        "--likelihood",
        choices=["gaussian", "nb"],
        default="gaussian",
        help="gaussian for log-normalised data (default), nb for raw counts",
    )
    train.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: scvi heuristic)"
    )
    train.add_argument("--batch-size", type=int, default=256, help="cells per minibatch")
    train.add_argument("--n-latent", type=int, default=16, help="size of each latent block")
    train.add_argument("--n-hidden", type=int, default=128, help="width of the hidden layers")
    train.add_argument("--out-model", required=True, help="folder to save the model to")
    train.add_argument("--overwrite", action="store_true", help="replace --out-model")
    train.add_argument(
        "--out-adata", default=None, help="write the cells with their latents (.h5ad / .h5mu)"
    )
    train.add_argument(
        "--rna-modality", default="rna", help="expression modality of an .h5mu (default: rna)"
    )
    train.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    train.add_argument("--accelerator", default="auto", help="Lightning accelerator")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--no-shrinkage",
        action="store_true",
        help="skip the second training that chooses how far predictions of unmeasured pairs "
        "shrink towards the context-adjusted additive baseline",
    )
    train.set_defaults(func=_train)

    predict = sub.add_parser(
        "predict",
        help="predict cells under another treatment with a saved model",
        description="Load a saved model and predict the expression of the given cells had they "
        "received --treatment at --dose; write the predictions as an .h5ad (X: expected "
        "expression on the training data's scale).",
        epilog="Example: fcr-tools predict --model fcr_model --adata screen.h5ad "
        "--obs-filter drug=control --obs-filter cell_line=A549 --treatment Dex --dose 1 "
        "--out pred.h5ad",
    )
    predict.add_argument("--model", required=True, help="folder of a saved model")
    predict.add_argument(
        "--adata",
        required=True,
        help="cells to transform: .h5ad, or .h5mu for a model trained from an .h5mu",
    )
    predict.add_argument("--treatment", required=True, help="target treatment label")
    predict.add_argument(
        "--dose", type=_dose, default=None, help="target dose (number, or d1+d2; default 1)"
    )
    predict.add_argument(
        "--mode",
        choices=["abduction", "prior", "sample"],
        default="abduction",
        help=(
            "abduction: each cell keeps its own deviation (default); prior: population "
            "response; sample: one draw from the target's priors per cell"
        ),
    )
    predict.add_argument(
        "--obs-filter",
        action="append",
        metavar="COLUMN=VALUE",
        help="use only the cells with obs[COLUMN] == VALUE (repeat to combine)",
    )
    predict.add_argument("--out", required=True, help="output .h5ad")
    predict.add_argument(
        "--seed", type=int, default=0, help="seed of the draws of --mode sample (default 0)"
    )
    predict.add_argument("--accelerator", default="auto", help="device: auto, cpu, gpu")
    predict.set_defaults(func=_predict)

    demo = sub.add_parser(
        "demo",
        help="simulate a screen, train FCR, plot latents and score counterfactuals",
        description="Simulate a perturbation screen with known ground truth, train FCR on it "
        "with some (cell line, drug) pairs held out, write the latents and their UMAPs, score "
        "counterfactual predictions of the held-out pairs against the exact truth and the "
        "baselines, and save a report (JSON + Markdown) and the model.",
    )
    demo.add_argument("--out", required=True, help="output directory")
    demo.add_argument("--quick", action="store_true", help="small screen, few epochs")
    demo.add_argument("--epochs", type=int, default=None, help="override training epochs")
    demo.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    demo.add_argument("--accelerator", default="auto", help="Lightning accelerator")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fcr-tools``: run a sub-command and return its exit status.

    User errors (missing or unwritable files, unknown columns or categories, data that do not
    match the model) print one line to stderr and return 2.

    Examples
    --------
    >>> from fcr_tools.cli import main
    >>> main(["predict", "--model", "absent", "--adata", "a.h5ad", "--treatment", "t",
    ...       "--out", "p.h5ad"])
    2
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, KeyError, ValueError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        message = " ".join(str(message).split())  # one line
        print(f"fcr-tools {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
