"""Ablations of the model choices behind held-out prediction, on every prediction benchmark.

One table: FCR as released in 0.1 (free posteriors, the interaction prior on the shared
covariate embedding, an MLP decoder over all blocks, prior-mode counterfactuals), each change
alone, and the combination (the 0.2 defaults); on top of the combination, the other decoders
and a linear treatment prior with learned Hill dose curves. Every configuration is trained on
the same data and seeds; the counterfactual mode is a prediction-time choice, so the "prior"
and "abduction" rows of one model come from the same training run.

Benchmarks (held-out (context, treatment) pairs, predicted from the context's training
controls, scored against the observed held-out cells):

* ``simulated``: ``simulate_screen`` as in ``prediction.py`` (4 cell lines x 6 drugs x 3
  doses, 4 pairs held out), with cell line x drug interactions;
* ``simulated, additive world``: the same without interactions;
* ``semi-real``: PBMCs with simulated cell-type-specific effects, as in ``semireal.py``;
* ``GxE CRISPRi`` and ``glioblastoma``: the real screens of ``realdata.py``.

Run from the repository root:  python benchmarks/ablations.py [--seeds 2] [--jobs 2] [--quick]
Writes benchmarks/results/ablations.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mean_sd, write_results
from prediction import SCREEN as SIM_SCREEN  # the simulated benchmark of prediction.py

SCORES = ["r2_deg20", "pearson_delta_deg20", "r2_all"]
OLD = {"posterior": "free", "interaction_context": "shared", "decoder": "mlp"}
NEW = {"posterior": "residual", "interaction_context": "centred", "decoder": "skip"}
# trained configurations: name -> (model arguments, counterfactual modes scored)
CONFIGS = {
    "0.1": (OLD, ["prior", "abduction"]),
    "residual posterior": ({**OLD, "posterior": "residual"}, ["prior"]),
    "centred interaction context": ({**OLD, "interaction_context": "centred"}, ["prior"]),
    "skip decoder": ({**OLD, "decoder": "skip"}, ["prior"]),
    "0.2 defaults": (NEW, ["abduction", "prior"]),
    "0.2 with the MLP decoder": ({**NEW, "decoder": "mlp"}, ["abduction"]),
    "0.2 with the additive decoder": ({**NEW, "decoder": "additive"}, ["abduction"]),
    "0.2 with a linear treatment prior and Hill doses": (
        {**NEW, "treatment_prior": "linear", "dose_response": "hill"},
        ["abduction"],
    ),
}


def load_task(name: str, seed: int, quick: bool):
    """(all cells with obs["split"], setup arguments, context key, epochs)."""
    from fcr_tools.data import simulate_screen

    if name.startswith("simulated"):
        screen = dict(SIM_SCREEN, interaction_strength=0.0 if "additive" in name else 1.0)
        if quick:
            screen.update(n_cell_lines=3, n_treatments=4, n_cells_per_condition=35, n_genes=50)
            screen.update(n_holdout_pairs=2)
        adata = simulate_screen(**screen, seed=seed)
        setup = {"treatment_key": "drug", "dose_key": "dose", "covariate_keys": "cell_line"}
        return adata, setup, 150
    if name == "semi-real":
        from semireal import SETUP, make_screen

        return make_screen(seed), dict(SETUP), 200
    from realdata import TASKS

    adata, setup, epochs = TASKS["gxe" if name == "GxE CRISPRi" else "glioblastoma"]()
    return adata, setup, epochs


TASK_NAMES = ["simulated", "simulated, additive world", "semi-real", "GxE CRISPRi", "glioblastoma"]


class _Mode:
    def __init__(self, model, mode):
        self.model, self.mode = model, mode

    def predict_counterfactual(self, controls, treatment, dose=None):
        return self.model.predict_counterfactual(
            controls, treatment=treatment, dose=dose, mode=self.mode
        )


def run_one(task: str, config: str, seed: int, quick: bool) -> pd.DataFrame:
    """Train one configuration on one benchmark and seed; score its modes and the baselines."""
    torch.set_num_threads(1)
    from _common import train_fcr

    from fcr_tools.baselines import AdditiveBaseline
    from fcr_tools.metrics import score_heldout_groups

    adata, setup, epochs = load_task(task, seed, quick)
    epochs = 3 if quick else epochs
    train = adata[adata.obs["split"] == "train"].copy()
    model_kwargs, modes = CONFIGS[config]
    start = time.perf_counter()
    # the model's own predictions (each configuration, without the shrinkage of train())
    model, _ = train_fcr(train.copy(), setup, model_kwargs, {}, epochs, seed, shrinkage=False)
    seconds = time.perf_counter() - start
    predictors = {f"{config} ({mode} mode)": _Mode(model, mode) for mode in modes}
    control = setup.get("control_treatment", "control")
    tk, ck, dk = setup["treatment_key"], setup["covariate_keys"], setup.get("dose_key")
    if config == "0.1":  # the baseline once per benchmark and seed
        predictors["additive baseline"] = AdditiveBaseline(
            train, tk, ck, dose_key=dk, control_treatment=control
        )
    table = score_heldout_groups(predictors, adata, tk, ck, dose_key=dk, control_treatment=control)
    per_seed = table.groupby("method", sort=False)[SCORES].mean().reset_index()
    per_seed["benchmark"], per_seed["seed"], per_seed["train_seconds"] = task, seed, seconds
    print(task, config, seed, per_seed[["method", *SCORES]].round(3).to_string(), flush=True)
    return per_seed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="trainings run in parallel")
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--tasks", nargs="+", default=TASK_NAMES, choices=TASK_NAMES)
    parser.add_argument("--name", default="ablations", help="result file name")
    args = parser.parse_args(argv)
    seeds = range(1) if args.quick else range(args.seeds)
    jobs = [(t, c, s) for t in args.tasks for s in seeds for c in CONFIGS]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        parts = list(pool.map(run_one, *zip(*jobs, strict=True), [args.quick] * len(jobs)))
    per_seed = pd.concat(parts, ignore_index=True)
    summary = mean_sd(per_seed, ["benchmark", "method"], SCORES)
    wide = per_seed.groupby(["method", "benchmark"], sort=False)["r2_deg20"].mean().unstack()
    wide = wide[[t for t in args.tasks if t in wide.columns]].reset_index()
    flags = " --quick" * args.quick + (f" --seeds {args.seeds}" if args.seeds != 2 else "")
    if args.tasks != TASK_NAMES:
        flags += " --tasks " + " ".join(f"'{t}'" for t in args.tasks)
    if args.name != "ablations":
        flags += f" --name {args.name}"
    write_results(
        args.name + ("_quick" if args.quick else ""),
        "python benchmarks/ablations.py" + flags,
        {
            "title": "Ablations: what each model choice buys on held-out pairs",
            "description": (
                f"Seeds {list(seeds)}; FCR trained 150 epochs (semi-real: 200) with default "
                "training settings; configurations: "
                + "; ".join(f"{k}: {v[0]}" for k, v in CONFIGS.items())
                + ". Scores averaged over the held-out groups of each seed, then mean ± sd over "
                "seeds. The first table is R2 on the top-20 DEGs, mean over seeds."
            ),
        },
        {"r2_deg20_(mean_over_seeds)": wide, "mean_±_sd_over_seeds": summary},
    )


if __name__ == "__main__":
    main()
