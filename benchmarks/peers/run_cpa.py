"""CPA (Lotfollahi et al., Mol. Syst. Biol. 2023; PyPI ``cpa-tools``) as a peer of FCR.

Run inside ``benchmarks/peers/.venv-cpa`` (made by ``install.sh``)::

    .venv-cpa/bin/python run_cpa.py --train TRAIN.h5ad --queries QUERIES.json \
        --out PRED.h5ad [--epochs 2000] [--seed 0] [--loss nb|gauss]

Set-up, following CPA's drug-screen tutorial "Predicting combinatorial drug perturbations"
(theislab/cpa ``docs/tutorials/combosciplex.ipynb``, the version of 2023-09-05 that goes with
cpa-tools 0.8.1):

* Data: raw counts (``layers["counts"]``) put in ``X`` with ``is_count_data=True`` and the
  negative-binomial loss, as in every CPA tutorial (combosciplex, Kang, Norman) and the package
  default (``recon_loss="nb"``). ``--loss gauss`` instead fits a Gaussian to the log-normalised
  ``X`` (CPA's option for normalised data).
* ``setup_anndata``: perturbation ``drug``, control group ``"control"``, dosage ``dose`` (the
  dose as given: the ``logsigm`` doser applies log1p itself; the tutorial's ``log_dose`` column is
  not described further), covariate ``cell_line``, ``max_comb_len`` = the largest number of
  drugs in one treatment (1 for single drugs), ``smiles_key="drug"`` (a work-around: 0.8.1's
  ``setup_anndata`` fails with ``KeyError: None`` without a SMILES column; the SMILES are used
  only with ``use_rdkit_embeddings=True``, off here). No DEG masks (``deg_uns_key``): they only
  weight CPA's validation metric.
* Model and training-plan parameters: ``ae_hparams`` and ``trainer_params`` of the tutorial
  (n_latent 128, encoder / decoder 3 x 512 with batch norm, dropout 0.1, logsigm doser,
  non-variational; 30 epochs of autoencoder pre-training, 50 of adversary warm-up, mixup
  alpha 0.1, reg_adv 20, pen_adv 20, lr 3e-4, wd 4e-7, step_size_lr 45, ...); ``seed`` from
  ``--seed``. ``train(max_epochs=2000, batch_size=128, early_stopping_patience=10,
  check_val_every_n_epoch=5)``: early stopping on CPA's validation metric after 10 checks
  without improvement. Validation set: CPA's default random 10% of the training cells
  (``train_size=0.9``).
* Counterfactual (``CPA.predict``: "to produce counterfactuals, ... set [X] to control cells
  gene expression"): the query cell line's training control cells with their perturbation and
  dosage set to the query's, ``model.predict(...)`` -> ``obsm["CPA_pred"]``. With the NB loss
  these are mean counts ``mu`` given each control cell's library size; like the tutorials,
  which score ``log1p`` of these means, the point prediction is the mean itself, put on the
  scale of ``X`` as ``log1p(mu / sum(mu) * 1e4)`` per cell. (This sits above the mean of the
  log-normalised counts wherever counts are low, by Jensen's inequality: a systematic shift
  that the Gaussian option does not have. Averaging log-normalised NB draws instead was worse
  on a small simulated screen: CPA's gene-wise dispersion barely moves from its random start
  at lr 3e-4 in a few hundred epochs.) With ``gauss`` the predicted means are on the scale of
  ``X`` already.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    CONTROL,
    Timer,
    control_indices,
    load_queries,
    load_train,
    lognormalize,
    parse_args,
    seed_everything,
    write_predictions,
)

# theislab/cpa docs/tutorials/combosciplex.ipynb (2023-09-05), cell "ae_hparams"
AE_HPARAMS = {
    "n_latent": 128,
    "recon_loss": "nb",
    "doser_type": "logsigm",
    "n_hidden_encoder": 512,
    "n_layers_encoder": 3,
    "n_hidden_decoder": 512,
    "n_layers_decoder": 3,
    "use_batch_norm_encoder": True,
    "use_layer_norm_encoder": False,
    "use_batch_norm_decoder": True,
    "use_layer_norm_decoder": False,
    "dropout_rate_encoder": 0.1,
    "dropout_rate_decoder": 0.1,
    "variational": False,
}
# ... cell "trainer_params"
TRAINER_PARAMS = {
    "n_epochs_kl_warmup": None,
    "n_epochs_pretrain_ae": 30,
    "n_epochs_adv_warmup": 50,
    "n_epochs_mixup_warmup": 3,
    "mixup_alpha": 0.1,
    "adv_steps": 2,
    "n_hidden_adv": 64,
    "n_layers_adv": 2,
    "use_batch_norm_adv": True,
    "use_layer_norm_adv": False,
    "dropout_rate_adv": 0.3,
    "reg_adv": 20.0,
    "pen_adv": 20.0,
    "lr": 0.0003,
    "wd": 4e-07,
    "adv_lr": 0.0003,
    "adv_wd": 4e-07,
    "adv_loss": "cce",
    "doser_lr": 0.0003,
    "doser_wd": 4e-07,
    "do_clip_grad": False,
    "gradient_clip_value": 1.0,
    "step_size_lr": 45,
}
# ... cell "model.train(...)" (besides use_gpu / save_path)
DEFAULT_EPOCHS = 2000
TRAIN_KWARGS = {"batch_size": 128, "early_stopping_patience": 10, "check_val_every_n_epoch": 5}
PREDICT_BATCH_SIZE = 1024  # the tutorial's model.predict(adata, batch_size=1024)


def main(argv=None) -> None:
    def add_arguments(parser):
        parser.add_argument(
            "--loss",
            choices=["nb", "gauss"],
            default="nb",
            help="nb: raw counts (layers['counts']) with a negative binomial, as CPA's "
            "tutorials (default); gauss: log-normalised X with a Gaussian",
        )

    args = parse_args(
        "CPA",
        f"default {DEFAULT_EPOCHS} as in CPA's tutorial; early stopping usually stops sooner",
        add_arguments,
        argv,
    )
    timer = Timer()
    seed_everything(args.seed, args.threads)
    import cpa
    import scvi
    import torch
    from cpa._utils import CPA_REGISTRY_KEYS

    scvi.settings.seed = args.seed
    train = load_train(args.train)
    queries = load_queries(args.queries, train)
    if args.loss == "nb":
        if "counts" not in train.layers:
            raise SystemExit("--loss nb needs raw counts in layers['counts']")
        train.X = train.layers["counts"].copy()  # as the tutorial: adata.X = counts
    if "counts" in train.layers:
        del train.layers["counts"]
    max_comb_len = int(max(len(d.split("+")) for d in train.obs["drug"].astype(str)))

    cpa.CPA.setup_anndata(
        train,
        perturbation_key="drug",
        control_group=CONTROL,
        dosage_key="dose",
        categorical_covariate_keys=["cell_line"],
        is_count_data=args.loss == "nb",
        max_comb_len=max_comb_len,
        # cpa-tools 0.8.1 raises KeyError: None in setup_anndata when smiles_key is None (it
        # always builds a drug -> SMILES map). The map is used only with
        # use_rdkit_embeddings=True (off here), so the drug names stand in for SMILES.
        smiles_key="drug",
    )
    ae_hparams = {**AE_HPARAMS, "recon_loss": args.loss, "seed": args.seed}
    model = cpa.CPA(adata=train, **ae_hparams)
    max_epochs = args.epochs or DEFAULT_EPOCHS
    timer.mark("setup_s")
    model.train(
        max_epochs=max_epochs,
        use_gpu=False,
        plan_kwargs=TRAINER_PARAMS,
        save_path=False,
        enable_progress_bar=False,
        **TRAIN_KWARGS,
    )
    timer.mark("train_s")
    epochs_run = int(sum(m == "train" for m in model.training_plan.epoch_history["mode"]))

    pad = CPA_REGISTRY_KEYS.PADDING_IDX
    blocks, sources = [], []
    for q in queries:
        idx = control_indices(train, q["cell_line"])
        cf = train[idx].copy()  # registered controls; scvi transfers the setup to the copy
        n = cf.n_obs
        cf.obs["drug"] = pd.Categorical(
            [q["drug"]] * n, categories=train.obs["drug"].cat.categories
        )
        cf.obs["dose"] = float(q["dose"])
        cf.obs[CPA_REGISTRY_KEYS.CONTROL_KEY] = 0
        perts = [model.pert_encoder[q["drug"]]] + [pad] * (max_comb_len - 1)
        doses = [float(q["dose"])] + [0.0] * (max_comb_len - 1)
        cf.obsm[CPA_REGISTRY_KEYS.PERTURBATIONS] = np.tile(perts, (n, 1)).astype(int)
        cf.obsm[CPA_REGISTRY_KEYS.PERTURBATIONS_DOSAGES] = np.tile(doses, (n, 1)).astype(float)
        model.predict(cf, batch_size=PREDICT_BATCH_SIZE)
        pred = np.asarray(cf.obsm["CPA_pred"], dtype=np.float64)
        if args.loss == "nb":  # predicted mean counts -> the scale of X
            pred = lognormalize(pred)
        blocks.append(pred)
        sources.append(idx)
    timer.mark("predict_s")

    info = {
        "peer": "cpa",
        "version": cpa.__version__,
        "scvi_tools": scvi.__version__,
        "torch": torch.__version__,
        "loss": args.loss,
        "max_epochs": max_epochs,
        "epochs_run": epochs_run,
        "seed": args.seed,
        "ae_hparams": ae_hparams,
        "trainer_params": TRAINER_PARAMS,
        "train_kwargs": TRAIN_KWARGS,
        "max_comb_len": max_comb_len,
        "output": "log1p(mu / sum(mu) * 1e4) of the NB means mu"
        if args.loss == "nb"
        else "Gaussian means (scale of X)",
        "timings": timer.marks,
    }
    out = write_predictions(args.out, train, queries, blocks, sources, info)
    timer.mark("total_s")
    print(
        f"cpa: {out.n_obs} x {out.n_vars} predictions for {len(queries)} queries -> {args.out}; "
        f"epochs run {epochs_run}; timings {timer.marks}"
    )


if __name__ == "__main__":
    main()
