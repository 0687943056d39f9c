"""biolord (Piran et al., Nat. Biotechnol. 2024; PyPI ``biolord``) as a peer of FCR.

Run inside ``benchmarks/peers/.venv-biolord`` (made by ``install.sh``)::

    .venv-biolord/bin/python run_biolord.py --train TRAIN.h5ad --queries QUERIES.json \
        --out PRED.h5ad [--epochs N] [--seed 0] [--threads 1] [--preset sciplex3|default]

Set-up, following biolord's own drug-screen experiment (sci-Plex3, in the authors'
reproducibility repository nitzanlab/biolord_reproducibility: ``utils/parameters_sciplex3.py``,
``notebooks/perturbations/sciplex3/1_perturbations_sciplex3_preprocessing.ipynb`` and
``2_perturbations_sciplex3_evaluation.ipynb``):

* Attributes: the cell line is a categorical attribute (``cell_type`` there); the treatment is
  one ordered attribute ``drug_dose`` in ``obsm``: the drug's feature vector followed by
  ``dose / max(dose)`` (sci-Plex3's ``rdkit2d_dose``). sci-Plex3 used RDKit descriptors of the
  molecule as drug features; a simulated screen has no molecules, so the features are a one-hot
  vector over the drugs (controls: all zeros, dose 0).
* Likelihood ``normal`` on log-normalised ``X`` (as for sci-Plex3); predictions are its means,
  on the scale of ``X``.
* Hyperparameters (``--preset``, see ``PRESETS``): ``sciplex3`` (default) is the sci-Plex3
  setting: ``module_params`` / ``trainer_params`` of ``parameters_sciplex3.py``, ``n_latent=256``,
  ``batch_size=512``, ``max_epochs=200``, early stopping on the validation biolord metric with
  patience 20, validation every 10 epochs. ``default`` is biolord 0.0.3's own defaults
  (smaller networks; ``max_epochs=min(round(20000 / n_cells * 400), 400)``), about 15 times
  cheaper per epoch on a CPU.
* Validation set (early stopping): 10% of the treated training cells at random. Control cells
  all stay in the training set: biolord has no encoder, each training cell's unknown attributes
  are a learned embedding indexed by the cell, so only trained cells have one.
* Counterfactual (as ``compute_prediction`` of the sci-Plex3 evaluation): take the query cell
  line's control cells (with their learned embeddings), replace their ``drug_dose`` attribute by
  the query's, and decode with ``model.module.get_expression``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    CONTROL,
    Timer,
    control_indices,
    load_queries,
    load_train,
    parse_args,
    seed_everything,
    write_predictions,
)

VALIDATION_FRACTION = 0.1
ATTRIBUTE = "drug_dose"

# Two documented settings (--preset):
# * "sciplex3": biolord's drug-screen setting, nitzanlab/biolord_reproducibility
#   utils/parameters_sciplex3.py (module_params, trainer_params) and the model / train calls of
#   notebooks/perturbations/sciplex3/2_perturbations_sciplex3_evaluation.ipynb
#   (n_latent=256, max_epochs=200, batch_size=512, early stopping patience 20, validation
#   every 10 epochs). Its 4 x 4096 decoder is built for a GPU.
# * "default": biolord 0.0.3's own defaults (Biolord(n_latent=128), BiolordModule and
#   biolordTrainingPlan defaults, Biolord.train defaults: batch_size=128, no early stopping,
#   max_epochs=min(round(20000 / n_cells * 400), 400)), with gene_likelihood="normal" (the
#   module default) on log-normalised X.
PRESETS = {
    "sciplex3": {
        "n_latent": 256,
        "module_params": {
            "decoder_width": 4096,
            "decoder_depth": 4,
            "attribute_nn_width": 2048,
            "attribute_nn_depth": 2,
            "use_batch_norm": False,
            "use_layer_norm": False,
            "unknown_attribute_noise_param": 2e1,
            "n_latent_attribute_ordered": 256,
            "n_latent_attribute_categorical": 3,
            "gene_likelihood": "normal",
            "reconstruction_penalty": 1e4,
            "unknown_attribute_penalty": 1e-1,
            "attribute_dropout_rate": 0.1,
        },
        "trainer_params": {
            "n_epochs_warmup": 0,
            "latent_lr": 1e-4,
            "latent_wd": 1e-4,
            "decoder_lr": 1e-4,
            "decoder_wd": 1e-4,
            "attribute_nn_lr": 1e-2,
            "attribute_nn_wd": 4e-8,
            "step_size_lr": 45,
            "cosine_scheduler": True,
            "scheduler_final_lr": 1e-5,
        },
        "train_kwargs": {
            "batch_size": 512,
            "early_stopping": True,
            "early_stopping_patience": 20,
            "check_val_every_n_epoch": 10,
        },
        "max_epochs": 200,
    },
    "default": {
        "n_latent": 128,
        "module_params": {"gene_likelihood": "normal"},
        # biolordTrainingPlan's defaults (attribute_nn_lr/wd=None, meaning "as latent_lr/wd")
        # fail in biolord 0.0.3 with an ordered attribute (AttributeError: no attribute
        # 'latent_lr': it is read before it is set), so the intended values are given.
        "trainer_params": {"attribute_nn_lr": 1e-4, "attribute_nn_wd": 1e-4},
        "train_kwargs": {"batch_size": 128, "early_stopping": False},
        "max_epochs": None,  # biolord's rule, from the number of cells
    },
}


def drug_dose_matrix(drugs: list[str], drug: np.ndarray, dose: np.ndarray, max_dose: float):
    """[one-hot over the non-control drugs, dose / max_dose]; controls are all zeros."""
    index = {d: i for i, d in enumerate(drugs)}
    out = np.zeros((len(drug), len(drugs) + 1), dtype=np.float32)
    for row, (d, x) in enumerate(zip(drug, dose, strict=True)):
        if d != CONTROL:
            out[row, index[d]] = 1.0
            out[row, -1] = x / max_dose
    return out


def main(argv=None) -> None:
    def add_arguments(parser):
        parser.add_argument(
            "--preset",
            choices=sorted(PRESETS),
            default="sciplex3",
            help="hyperparameters: biolord's sci-Plex3 drug-screen setting (default) or the "
            "package defaults",
        )

    args = parse_args(
        "biolord",
        "default: the preset's, 200 for sciplex3 (early stopping may stop sooner), "
        "min(round(20000 / n_cells * 400), 400) for default",
        add_arguments,
        argv,
    )
    preset = PRESETS[args.preset]
    timer = Timer()
    seed_everything(args.seed, args.threads)
    import biolord
    import scvi
    import torch

    scvi.settings.seed = args.seed
    train = load_train(args.train)
    queries = load_queries(args.queries, train)

    drug = train.obs["drug"].astype(str).to_numpy()
    dose = train.obs["dose"].to_numpy(dtype=np.float64)
    drugs = [d for d in train.obs["drug"].cat.categories if d != CONTROL]
    max_dose = float(dose[drug != CONTROL].max())
    train.obsm[ATTRIBUTE] = drug_dose_matrix(drugs, drug, dose, max_dose)
    if "counts" in train.layers:
        del train.layers["counts"]  # the normal likelihood models X

    rng = np.random.default_rng(args.seed)
    treated = np.flatnonzero(drug != CONTROL)
    n_val = round(VALIDATION_FRACTION * treated.size)
    split = np.full(train.n_obs, "train", dtype=object)
    split[rng.choice(treated, size=n_val, replace=False)] = "test"  # biolord's valid_split
    train.obs["split"] = split

    biolord.Biolord.setup_anndata(
        train, ordered_attributes_keys=[ATTRIBUTE], categorical_attributes_keys=["cell_line"]
    )
    model = biolord.Biolord(
        adata=train,
        n_latent=preset["n_latent"],
        model_name="fcr_peer",
        module_params={**preset["module_params"], "seed": args.seed},
        train_classifiers=False,
        split_key="split",
    )
    max_epochs = args.epochs or preset["max_epochs"]
    if max_epochs is None:  # Biolord.train's own rule
        max_epochs = int(min(round((20000 / train.n_obs) * 400), 400))
    timer.mark("setup_s")
    model.train(
        max_epochs=max_epochs,
        plan_kwargs=preset["trainer_params"],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_workers=0,
        **preset["train_kwargs"],
    )
    timer.mark("train_s")
    epochs_run = sum(m == "train" for m in model.training_plan.epoch_history["mode"])

    model.module.eval()
    blocks, sources = [], []
    with torch.no_grad():
        for q in queries:
            idx = control_indices(train, q["cell_line"])
            dataset = model.get_dataset(train, indices=idx)
            target = drug_dose_matrix(
                drugs, np.array([q["drug"]]), np.array([q["dose"]]), max_dose
            )
            dataset = dict(dataset)
            dataset[ATTRIBUTE] = torch.as_tensor(target).repeat(len(idx), 1).to(model.device)
            mus, _ = model.module.get_expression(dataset)
            blocks.append(mus.detach().cpu().numpy())
            sources.append(idx)
    timer.mark("predict_s")

    info = {
        "peer": "biolord",
        "version": biolord.__version__ if hasattr(biolord, "__version__") else "?",
        "scvi_tools": scvi.__version__,
        "torch": torch.__version__,
        "preset": args.preset,
        "max_epochs": max_epochs,
        "epochs_run": epochs_run,
        "seed": args.seed,
        "n_latent": preset["n_latent"],
        "module_params": preset["module_params"],
        "trainer_params": preset["trainer_params"],
        "train_kwargs": preset["train_kwargs"],
        "drug_features": "one-hot over drugs + dose/max_dose",
        "max_dose": max_dose,
        "timings": timer.marks,
    }
    pred = write_predictions(args.out, train, queries, blocks, sources, info)
    timer.mark("total_s")
    print(
        f"biolord: {pred.n_obs} x {pred.n_vars} predictions for {len(queries)} queries -> "
        f"{args.out}; epochs run {epochs_run}; timings {timer.marks}"
    )


if __name__ == "__main__":
    main()
