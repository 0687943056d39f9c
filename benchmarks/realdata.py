"""Held-out (context, treatment) pairs on the real screens shipped with fcr_tools.

Three tasks on real expression, each holding out every treated cell of some (context,
treatment) pairs; every method predicts them from that context's training control cells and
is scored against the observed held-out cells:

* ``gxe``: sci-Plex-GxE CRISPRi (``fcr_tools.data.sciplex_gxe``), 3 glioblastoma lines x 9
  knockdowns; held out (A172, MAPK1), (T98G, TGFBR2), (U87MG, SGK1).
* ``glioblastoma``: 5 patients' tumour slices x DMSO / panobinostat
  (``fcr_tools.data.glioblastoma_panobinostat``, log-normalised); held out the panobinostat
  cells of patients PW030 and PW036 (their DMSO cells stay in training).
* ``norman``: K562 CRISPRa (``fcr_tools.data.norman19``); held out four double perturbations
  whose two single perturbations were measured (one context: a combination task).

Scores per held-out group (``fcr_tools.metrics.response_scores``): R2 of the mean on all genes
and on the top-20 DEGs, Pearson of the predicted change from control on the top-20 DEGs and
on all genes. ``split-half`` is the noise ceiling: one random half of the true held-out cells
predicting the other half. Latent structure of FCR (training cells, k-means): NMI of z_x
against the context and of z_t against the treatment (treated cells).

Methods: FCR (defaults, or ``--model-kwargs`` / ``--plan-kwargs``), the control mean, the
additive baseline (for combinations: the sum of the parts' shifts), and biolord and CPA
(``benchmarks/peers``; single perturbations only, so not on ``norman``). CPA fits the raw
counts where a screen has them (glioblastoma) and a Gaussian on the log-normalised values
where it does not (GxE).

Run from the repository root:  python benchmarks/realdata.py [--quick] [--seeds 3]
[--tasks gxe glioblastoma norman] [--no-peers]
Writes benchmarks/results/realdata.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_model_arguments, mean_sd, model_flags, train_fcr, write_results
from prediction import Precomputed, install_summary, peer_status, run_peer

from fcr_tools.baselines import AdditiveBaseline, ControlMeanBaseline
from fcr_tools.data import glioblastoma_panobinostat, norman19, sciplex_gxe
from fcr_tools.metrics import cluster_scores, response_scores, score_heldout_groups

SCORES = ["r2_all", "r2_deg20", "pearson_delta_deg20", "pearson_delta_all"]
NORMAN_HELDOUT = ("KLF1+MAP2K6", "MAP2K3+MAP2K6", "MAPK1+TGFBR2", "KLF1+TGFBR2")


def _hold_out(adata: ad.AnnData, context: str, treatment: str, pairs: set) -> None:
    """obs["split"]: "holdout" for the cells of the given (context, treatment) pairs."""
    keys = zip(adata.obs[context].astype(str), adata.obs[treatment].astype(str), strict=True)
    adata.obs["split"] = ["holdout" if k in pairs else "train" for k in keys]


def _task_gxe():
    adata = sciplex_gxe()
    held = {("A172", "MAPK1"), ("T98G", "TGFBR2"), ("U87MG", "SGK1")}
    _hold_out(adata, "cell_line", "perturbation", held)
    setup = {"treatment_key": "perturbation", "covariate_keys": "cell_line"}
    return adata, setup, 150


def _task_glioblastoma():
    adata = glioblastoma_panobinostat()
    held = {("PW030", "panobinostat"), ("PW036", "panobinostat")}
    _hold_out(adata, "patient", "treatment", held)
    setup = {
        "treatment_key": "treatment",
        "control_treatment": "DMSO",
        "covariate_keys": "patient",
    }
    return adata, setup, 150


def _task_norman():
    adata = norman19()
    held = adata.obs["perturbation"].astype(str).isin(NORMAN_HELDOUT)
    adata.obs["split"] = np.where(held, "holdout", "train")
    setup = {"treatment_key": "perturbation", "covariate_keys": "cell_line"}
    return adata, setup, 150


TASKS = {"gxe": _task_gxe, "glioblastoma": _task_glioblastoma, "norman": _task_norman}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


class _ScoredAllGenes:
    """Wraps a predictor and remembers its predicted means, for Pearson on all genes."""

    def __init__(self, predictor):
        self.predictor, self.means = predictor, {}

    def predict_counterfactual(self, controls, treatment, dose=None, **kwargs):
        pred = self.predictor.predict_counterfactual(controls, treatment=treatment, dose=dose)
        context = "|".join(str(controls.obs[c].iloc[0]) for c in self.context_keys)
        self.means[(context, str(treatment))] = _dense(pred.X).mean(0)
        return pred


def _peer_view(adata: ad.AnnData, setup: dict) -> ad.AnnData:
    """The obs columns the peer adapters read: cell_line, drug ("control"), dose."""
    view = ad.AnnData(X=adata.X.copy(), obs=pd.DataFrame(index=adata.obs_names))
    view.var_names = adata.var_names
    control = setup.get("control_treatment", "control")
    treatment = adata.obs[setup["treatment_key"]].astype(str)
    view.obs["cell_line"] = adata.obs[setup["covariate_keys"]].astype(str).to_numpy()
    view.obs["drug"] = np.where(treatment == control, "control", treatment)
    view.obs["dose"] = np.where(treatment == control, 0.0, 1.0)
    if "counts" in adata.layers:
        view.layers["counts"] = adata.layers["counts"].copy()
    return view


class _PeerByContext(Precomputed):
    """A peer's predictions, answered for the task's own column names."""

    def __init__(self, predictions, setup):
        super().__init__(predictions)
        self.setup = setup

    def predict_counterfactual(self, controls, treatment, dose=None, **kwargs):
        renamed = controls.copy()
        renamed.obs["cell_line"] = controls.obs[self.setup["covariate_keys"]].astype(str)
        return super().predict_counterfactual(renamed, treatment, dose=1.0)


def split_half(adata: ad.AnnData, setup: dict, seed: int) -> list[dict]:
    """One random half of each held-out group predicting the other half (noise ceiling)."""
    rng = np.random.default_rng(seed)
    obs = adata.obs
    control = setup.get("control_treatment", "control")
    treatment, context = obs[setup["treatment_key"]].astype(str), obs[setup["covariate_keys"]]
    held = (obs["split"] == "holdout").to_numpy()
    rows = []
    for (c, t), idx in (
        obs[held].groupby([context[held], treatment[held]], observed=True).groups.items()
    ):
        cells = rng.permutation(adata.obs_names.get_indexer(idx))
        half = len(cells) // 2
        ctrl = (context == c).to_numpy() & (treatment == control).to_numpy() & ~held
        a, b, x0 = (
            _dense(adata.X[cells[:half]]),
            _dense(adata.X[cells[half:]]),
            _dense(adata.X[ctrl]),
        )
        scores = response_scores(a, b, x0)
        delta = a.mean(0) - x0.mean(0), b.mean(0) - x0.mean(0)
        scores["pearson_delta_all"] = _pearson(delta[1], delta[0])
        rows.append({"context": str(c), "treatment": t, "method": "split-half", **scores})
    return rows


def run_task(name: str, seed: int, args, epochs: int | None, peers: list[str]):
    adata, setup, default_epochs = TASKS[name]()
    train = adata[adata.obs["split"] == "train"].copy()
    tk, ck = setup["treatment_key"], setup["covariate_keys"]
    control = setup.get("control_treatment", "control")
    model, seconds = train_fcr(
        train.copy(), setup, args.model_kwargs, args.plan_kwargs, epochs or default_epochs, seed
    )
    predictors = {
        "FCR": model,
        "additive": AdditiveBaseline(train, tk, ck, control_treatment=control),
        "control mean": ControlMeanBaseline(train, tk, ck, control_treatment=control),
    }
    heldout = adata.obs[adata.obs["split"] == "holdout"]
    queries = [
        {"cell_line": str(c), "drug": str(t), "dose": 1.0}
        for c, t in heldout[[ck, tk]].drop_duplicates().to_numpy()
    ]
    failures = {}
    for peer in peers:
        try:
            view = _peer_view(train, setup)
            # CPA fits raw counts (its default); the GxE screen has none, so a Gaussian there
            extra = ["--loss", "gauss"] if peer == "cpa" and "counts" not in view.layers else None
            pred = run_peer(peer, view, queries, args.peer_epochs, seed, extra)
            pred.obs["cell_line"] = pred.obs["cell_line"].astype(str)
            predictors[peer] = _PeerByContext(pred, setup)
        except Exception as err:  # the table says why a peer is missing
            failures[f"{name}: {peer}"] = str(err)
    wrapped = {k: _ScoredAllGenes(v) for k, v in predictors.items()}
    for w in wrapped.values():
        w.context_keys = [ck]
    table = score_heldout_groups(wrapped, adata, tk, ck, control_treatment=control)
    # Pearson of the change from control on all genes (not among response_scores' columns)
    controls = {
        c: _dense(train[(train.obs[ck] == c).to_numpy() & (train.obs[tk] == control).to_numpy()].X)
        for c in table[ck].unique()
    }
    pearson_all = []
    for _, row in table.iterrows():
        idx = (
            (adata.obs[ck] == row[ck])
            & (adata.obs[tk] == row[tk])
            & (adata.obs["split"] == "holdout")
        )
        truth = _dense(adata[idx.to_numpy()].X).mean(0)
        base = controls[row[ck]].mean(0)
        pred = wrapped[row["method"]].means[(str(row[ck]), str(row[tk]))]
        pearson_all.append(_pearson(truth - base, pred - base))
    table["pearson_delta_all"] = pearson_all
    table = table.rename(columns={ck: "context", tk: "treatment"})
    table = pd.concat([table, pd.DataFrame(split_half(adata, setup, seed))], ignore_index=True)
    table["task"], table["seed"] = name, seed

    treated = (train.obs[tk].astype(str) != control).to_numpy()
    latent = {"task": name, "seed": seed, "train_seconds": seconds}
    z_x = model.get_latent_representation(train, block="x")
    z_t = model.get_latent_representation(train, block="t")
    context_labels = train.obs[ck].astype(str).to_numpy()
    treatment_labels = train.obs[tk].astype(str).to_numpy()
    if len(set(context_labels)) > 1:
        latent["nmi_zx_context"] = cluster_scores(z_x, context_labels, seed=seed)["nmi"]
        latent["nmi_zt_context"] = cluster_scores(z_t, context_labels, seed=seed)["nmi"]
    if len(set(treatment_labels[treated])) > 1:
        labels = treatment_labels[treated]
        latent["nmi_zt_treatment"] = cluster_scores(z_t[treated], labels, seed=seed)["nmi"]
        latent["nmi_zx_treatment"] = cluster_scores(z_x[treated], labels, seed=seed)["nmi"]
    else:  # one treatment: treated vs control
        labels = np.where(treated, "treated", "control")
        latent["nmi_zt_treatment"] = cluster_scores(z_t, labels, seed=seed)["nmi"]
        latent["nmi_zx_treatment"] = cluster_scores(z_x, labels, seed=seed)["nmi"]
    return table, latent, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--peer-epochs", type=int, default=200)
    add_model_arguments(parser, "realdata")
    args = parser.parse_args(argv)
    seeds, epochs = range(args.seeds), None
    if args.quick:
        seeds, epochs, args.peer_epochs = range(1), 3, 3

    tables, latents, failures = [], [], {}
    for name in args.tasks:
        peers = [] if args.no_peers or name == "norman" else ["biolord", "cpa"]
        for seed in seeds:
            table, latent, failed = run_task(name, seed, args, epochs, peers)
            tables.append(table)
            latents.append(latent)
            failures.update(failed)
            print(
                name, seed, table.groupby("method", sort=False)[SCORES].mean().round(3), flush=True
            )
    groups = pd.concat(tables, ignore_index=True)
    per_seed = groups.groupby(["task", "method", "seed"], sort=False)[SCORES].mean().reset_index()
    summary = mean_sd(per_seed, ["task", "method"], SCORES)
    latent = pd.DataFrame(latents)
    latent_cols = [c for c in latent.columns if c.startswith("nmi")]
    latent_summary = mean_sd(latent, ["task"], latent_cols)
    notes = [f"- {name}: not run: {why}" for name, why in failures.items()]
    notes += [f"- {n} install: {install_summary(i)}" for n, i in peer_status().items()]
    flags = " --quick" * args.quick + " --no-peers" * args.no_peers
    if args.tasks != list(TASKS):
        flags += " --tasks " + " ".join(args.tasks)
    write_results(
        args.name + ("_quick" if args.quick else ""),
        "python benchmarks/realdata.py" + flags + model_flags(args, "realdata"),
        {
            "title": "Held-out pairs on real screens",
            "description": (
                f"FCR with {args.model_kwargs or 'default settings'} (training plan: "
                f"{args.plan_kwargs or 'default'}), 150 epochs; peers capped at "
                f"{args.peer_epochs} epochs. Held out: GxE (A172, MAPK1), (T98G, TGFBR2), "
                "(U87MG, SGK1); glioblastoma: panobinostat in PW030 and PW036; Norman: "
                f"{', '.join(NORMAN_HELDOUT)}. Scores averaged over the held-out groups of "
                "each seed, then mean ± sd over seeds. Truth: the observed held-out cells."
            ),
            "notes": notes,
        },
        {
            "summary_mean_±_sd_over_seeds": summary,
            "latent_NMI_(FCR,_training_cells)": latent_summary,
            "per_group": groups.round(4),
        },
    )


if __name__ == "__main__":
    main()
