"""Held-out (cell line, drug) prediction on simulated screens: FCR vs baselines vs peers.

Four (cell line, drug) pairs (all doses) are held out of training; every method predicts them
from the cell line's control cells, and is scored against the observed held-out cells
(field-standard scores per (cell line, drug, dose) group: R2 of mean expression on all genes
and on the top-20 / top-50 DEGs, R2 of the change from control, Pearson of the change on the
top-20 DEGs, energy distance). FCR is scored with its default counterfactual mode (``"prior"``,
the decoded prior means) and with ``mode="sample"`` (one draw from the target's priors per
cell). Two worlds: with cell line x drug interactions
(``interaction_strength=1``, the default) and purely additive (``interaction_strength=0``).
Peers (biolord, CPA) run in their own environments (benchmarks/peers/install.sh); a peer that
is not installed is reported as such.

Run from the repository root:  python benchmarks/prediction.py [--quick] [--seeds 3]
Writes benchmarks/results/prediction.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import anndata as ad
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_model_arguments, mean_sd, model_flags, train_fcr, write_results

from fcr_tools.baselines import AdditiveBaseline, ControlMeanBaseline
from fcr_tools.data import simulate_screen
from fcr_tools.metrics import score_heldout_groups

PEERS = Path(__file__).resolve().parent / "peers"
# biolord's package defaults: its sci-Plex3 preset (a 4 x 4096 decoder, built for a GPU) takes
# about 10 s per epoch on this screen with 2 CPU threads, some 30 minutes per training run
PEER_ARGS = {"biolord": ["--preset", "default"], "cpa": []}
SETUP = {"treatment_key": "drug", "dose_key": "dose", "covariate_keys": "cell_line"}
SCORES = ["r2_all", "r2_deg20", "r2_deg50", "r2_delta", "pearson_delta_deg20", "energy_distance"]

# the simulated screen of held-out pair prediction (also ablations.py's)
SCREEN = {
    "n_cell_lines": 4,
    "n_treatments": 6,
    "doses": (0.1, 0.3, 1.0),
    "n_cells_per_condition": 60,
    "n_genes": 200,
    "n_latent_x": 4,
    "n_latent_t": 4,
    "n_latent_tx": 4,
    "n_holdout_pairs": 4,
}


class Precomputed:
    """Predictions made elsewhere (a peer), answered like ``predict_counterfactual``."""

    def __init__(self, predictions: ad.AnnData):
        self.pred = predictions
        self.keys = (
            predictions.obs["cell_line"].astype(str)
            + "|"
            + predictions.obs["drug"].astype(str)
            + "|"
            + predictions.obs["dose"].astype(float).map(repr)
        ).to_numpy()

    def predict_counterfactual(self, controls, treatment, dose=None, **kwargs):
        lines = controls.obs["cell_line"].astype(str).unique()
        key = f"{lines[0]}|{treatment}|{float(dose)!r}"
        rows = self.keys == key
        if len(lines) != 1 or not rows.any():
            raise KeyError(f"No peer prediction for {key}.")
        return self.pred[rows]


class Mode:
    """An FCRModel whose counterfactuals use another ``mode`` (e.g. ``"sample"``)."""

    def __init__(self, model, mode: str):
        self.model, self.mode = model, mode

    def predict_counterfactual(self, controls, treatment, dose=None):
        return self.model.predict_counterfactual(
            controls, treatment=treatment, dose=dose, mode=self.mode
        )


def peer_status() -> dict:
    path = PEERS / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def install_summary(info: dict) -> str:
    """A peer's install status without the paths of this machine."""
    if not info.get("ok"):
        return f"not usable: {info.get('reason', info.get('error', 'see its install log'))}"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(info.get("versions", {}).items()))
    return f"ok ({versions})"


def run_peer(
    name: str,
    train: ad.AnnData,
    queries: list[dict],
    epochs: int,
    seed: int,
    extra_args: list[str] | None = None,
):
    """Run a peer's adapter in its own venv; returns predictions or raises with the reason.

    ``extra_args`` replace the peer's default options (``PEER_ARGS``)."""
    python = PEERS / f".venv-{name}" / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"{name} is not installed (run benchmarks/peers/install.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        train_path, query_path, out = Path(tmp, "t.h5ad"), Path(tmp, "q.json"), Path(tmp, "p.h5ad")
        train.write_h5ad(train_path)
        query_path.write_text(json.dumps(queries))
        cmd = [str(python), str(PEERS / f"run_{name}.py"), "--train", str(train_path)]
        cmd += ["--queries", str(query_path), "--out", str(out)]
        options = PEER_ARGS[name] if extra_args is None else extra_args
        cmd += ["--epochs", str(epochs), "--seed", str(seed), *options]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed: {done.stderr.strip().splitlines()[-1:]}")
        return ad.read_h5ad(out)


def run_world(
    screen: dict, seed: int, epochs: dict, peers: list[str], model_kwargs: dict, plan_kwargs: dict
) -> tuple[list, dict]:
    adata = simulate_screen(**screen, seed=seed)
    train = adata[adata.obs["split"] == "train"].copy()
    model, _ = train_fcr(train.copy(), SETUP, model_kwargs, plan_kwargs, epochs["fcr"], seed)
    predictors = {
        "FCR": model,
        "FCR (sample mode)": Mode(model, "sample"),
        "additive": AdditiveBaseline(train, "drug", "cell_line", dose_key="dose"),
        "control mean": ControlMeanBaseline(train, "drug", "cell_line", dose_key="dose"),
    }
    heldout = adata.obs[(adata.obs["split"] == "holdout") & (adata.obs["drug"] != "control")]
    queries = [
        {"cell_line": str(c), "drug": str(d), "dose": float(x)}
        for c, d, x in heldout[["cell_line", "drug", "dose"]].drop_duplicates().to_numpy()
    ]
    failures = {}
    for name in peers:
        try:
            predictors[name] = Precomputed(run_peer(name, train, queries, epochs[name], seed))
        except Exception as err:  # the table reports why a peer is missing
            failures[name] = str(err)
    table = score_heldout_groups(predictors, adata, "drug", "cell_line", dose_key="dose")
    table["seed"] = seed
    return table, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true")
    add_model_arguments(parser, "prediction")
    args = parser.parse_args(argv)

    screen = dict(SCREEN)
    epochs = {"fcr": 150, "biolord": 200, "cpa": 200}
    seeds = range(args.seeds)
    if args.quick:
        screen.update(n_cell_lines=3, n_treatments=4, n_cells_per_condition=35, n_genes=50)
        screen.update(n_holdout_pairs=2)
        epochs, seeds = {"fcr": 3, "biolord": 3, "cpa": 3}, range(1)
    peers = [] if args.no_peers else ["biolord", "cpa"]

    tables, failures = [], {}
    for strength in (1.0, 0.0):
        for seed in seeds:
            table, failed = run_world(
                {**screen, "interaction_strength": strength},
                seed,
                epochs,
                peers,
                args.model_kwargs,
                args.plan_kwargs,
            )
            table["interactions"] = "yes" if strength > 0 else "no (additive world)"
            tables.append(table)
            failures.update(failed)
            print(table.groupby("method")[SCORES].mean().round(3), flush=True)
    groups = pd.concat(tables, ignore_index=True)
    per_seed = groups.groupby(["interactions", "method", "seed"], sort=False)[SCORES].mean()
    summary = mean_sd(per_seed.reset_index(), ["interactions", "method"], SCORES)
    notes = [f"- {name}: not run: {why}" for name, why in failures.items()]
    status = peer_status()
    notes += [f"- {name} install: {install_summary(info)}" for name, info in status.items()]
    flags = (
        " --quick" * args.quick + " --no-peers" * args.no_peers + model_flags(args, "prediction")
    )
    write_results(
        args.name + ("_quick" if args.quick else ""),
        "python benchmarks/prediction.py" + flags,
        {
            "title": "Held-out pair prediction on simulated screens",
            "description": (
                f"Screen: {screen}; FCR with {args.model_kwargs or 'default settings'} "
                f"(training plan: {args.plan_kwargs or 'default'}), "
                f"{epochs['fcr']} epochs. Scores "
                "are averaged over the held-out (cell line, drug, dose) groups of each seed, "
                "then mean ± sd over seeds. Truth: the observed held-out cells. Peers: "
                f"biolord with its package defaults ({' '.join(PEER_ARGS['biolord'])}), CPA "
                "with the settings of its drug-screen tutorial (early stopping), both capped "
                "at the epochs below; see benchmarks/peers/README.md."
            ),
            "notes": notes,
            "epochs": epochs,
        },
        {"summary_mean_±_sd_over_seeds": summary, "per_group": groups.round(4)},
    )


if __name__ == "__main__":
    main()
