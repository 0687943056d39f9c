"""FCR's predictions of unmeasured pairs shrunk towards a baseline by a weight validated
inside the training data (:meth:`fcr_tools.FCRModel.fit_shrinkage`, which ``FCRModel.train``
runs by default).

FCR beats the additive baseline on some screens (GxE CRISPRi) and not on others
(glioblastoma, the Norman doubles, the simulated screen with interactions). The prediction
``w * FCR + (1 - w) * baseline`` of an unmeasured pair is FCR's interaction shrunk towards a
composition of main effects: the model's shrinkage target, the context-adjusted additive
baseline (:class:`fcr_tools.baselines.ContextAdjustedBaseline`; the plain additive baseline in
models saved before it). ``fit_shrinkage`` chooses ``w`` from the training data only: it holds
out some measured (context, treatment) pairs again, trains a second FCR without them, and takes
the least-squares weight of its and the baseline's predicted group means on those pairs. Here
the benchmark's real held-out pairs, which play no part in choosing ``w``, are then predicted
with it.

Rows: ``FCR`` (the model's own prediction, shrinkage off), ``additive`` (the plain additive
baseline, the one to beat), ``context-adjusted additive`` (the shrinkage target on its own),
``FCR shrunk (validated w)`` (the default prediction), ``blend (w=0.5)`` (fixed, untuned), and
``blend (oracle w)``, which takes the least-squares weight on the test pairs themselves: a
ceiling for the idea, not a method.

Run from the repository root:
    python benchmarks/validated_blend.py --tasks gxe glioblastoma norman sim sim_additive \
        semireal --seeds 0 --name validated_blend_s0
    python benchmarks/validated_blend.py --combine validated_blend_s0 validated_blend_s1 ...
Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, mean_sd, train_fcr, write_results
from expression_abduction import EXTRA
from realdata import TASKS

from fcr_tools._registration import RegisteredSetup
from fcr_tools._shrinkage import (
    group_means,
    held_out_groups,
    internal_pairs,
    least_squares_sums,
    least_squares_weight,
    saved_target,
)
from fcr_tools.baselines import AdditiveBaseline
from fcr_tools.metrics import score_heldout_groups

SCORES = ["r2_all", "r2_deg20", "pearson_delta_deg20"]
ALL_TASKS = [*TASKS, *EXTRA]


class Weighted:
    """The trained model predicting with another shrinkage weight (``None``: FCR's own)."""

    def __init__(self, model, weight: float | None):
        self.model, self.weight = model, weight

    def predict_counterfactual(self, adata, treatment, dose=None, **kwargs):
        record = self.model.shrinkage_
        self.model.shrinkage_ = None if self.weight is None else {**record, "weight": self.weight}
        try:
            return self.model.predict_counterfactual(
                adata, treatment=treatment, dose=dose, **kwargs
            )
        finally:
            self.model.shrinkage_ = record


def run(
    name: str,
    seed: int,
    epochs: int | None = None,
    extra_folds: int = 0,
    model_kwargs: dict | None = None,
    plan_kwargs: dict | None = None,
) -> tuple[pd.DataFrame, dict]:
    adata, setup, default_epochs = TASKS[name]() if name in TASKS else EXTRA[name](seed)
    epochs = epochs or default_epochs
    tk, ck, dk = setup["treatment_key"], setup["covariate_keys"], setup.get("dose_key")
    control = setup.get("control_treatment", "control")
    train = adata[adata.obs["split"] == "train"].copy()
    # FCR's defaults: train() ends by choosing the weight (a second training, same settings)
    model, seconds = train_fcr(
        train.copy(), setup, model_kwargs or {}, dict(plan_kwargs or {}), epochs, seed
    )
    record = model.shrinkage_
    registered = RegisteredSetup.from_registry(model.registry_)
    genes = model.get_var_names()
    target = saved_target(record, registered, genes)  # what the default shrinks towards
    additive = AdditiveBaseline.from_group_means(target._means)  # the plain one, same means
    # the ceiling: the least-squares weight on the test pairs themselves
    held = (adata.obs["split"] == "holdout").to_numpy()
    fcr = Weighted(model, None)
    test_groups = group_means(fcr, target, adata, held, registered, 10)
    oracle = least_squares_weight(test_groups)
    # experiment: the weight chosen on each held-out group's top DEGs (same second training)
    deg_weights = {
        int(k): least_squares_weight(sums=sums) for k, sums in record["sums_top_degs"].items()
    }
    predictors = {
        "FCR": fcr,
        "additive": additive,
        "context-adjusted additive": target,
        "FCR shrunk (validated w)": model,
        **{f"FCR shrunk (w on top-{k} DEGs)": Weighted(model, w) for k, w in deg_weights.items()},
        "blend (w=0.5)": Weighted(model, 0.5),
        "blend (oracle w)": Weighted(model, oracle),
    }
    pooled = None
    if extra_folds:  # experiment: more held-out pairs, one more second training per fold
        sums, used = list(record["sums"]), [tuple(p) for p in record["pairs"]]
        train_contexts = additive._means.context_labels(model.adata)
        train_treatments = model.adata.obs[tk].astype(str).to_numpy()
        for fold in range(extra_folds):
            rng = np.random.default_rng(seed + 1000 * (fold + 1))
            pairs = internal_pairs(train_contexts, train_treatments, control, rng, used)
            if not pairs:
                break
            groups = held_out_groups(
                model, pairs, epochs, seed, plan_kwargs=plan_kwargs, enable_progress_bar=False
            )
            num, den = least_squares_sums(groups)
            sums, used = [sums[0] + num, sums[1] + den], used + pairs
        pooled = least_squares_weight(sums=sums)
        predictors[f"FCR shrunk ({extra_folds + 1}-fold w)"] = Weighted(model, pooled)
    table = score_heldout_groups(predictors, adata, tk, ck, control_treatment=control, dose_key=dk)
    per_seed = table.groupby("method", sort=False)[SCORES].mean().reset_index()
    per_seed["task"], per_seed["seed"] = name, seed
    info = {
        "task": name,
        "seed": seed,
        "internal_pairs": record["pairs"],
        "validated_w": round(record["weight"], 4),
        "target": record.get("target", "additive"),
        "slope": round(record.get("slope", 0.0), 4),
        "oracle_w": round(oracle, 4),
        **{f"top{k}_deg_w": round(w, 4) for k, w in deg_weights.items()},
        "oracle_top20_deg_w": round(least_squares_weight(test_groups, n_degs=20), 4),
        "pooled_w": None if pooled is None else round(pooled, 4),
        "train_seconds_both": round(seconds, 1),
    }
    print(per_seed.round(3).to_string(), info, flush=True)
    return per_seed, info


def summarise(rows: pd.DataFrame, weights: pd.DataFrame):
    summary = mean_sd(rows, ["task", "method"], SCORES)
    grouped = weights.groupby("task", sort=False)
    columns = [c for c in ("validated_w", "oracle_w", "slope") if c in weights]
    w = grouped[columns].agg(["mean", "std"]).round(3)
    w.columns = [f"{a}_{b}" for a, b in w.columns]
    return summary, w.reset_index()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=ALL_TASKS, choices=ALL_TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--name", default="validated_blend")
    parser.add_argument("--epochs", type=int, help="override the tasks' epochs (smoke test)")
    parser.add_argument("--combine", nargs="+", help="merge the per-seed rows of these runs")
    parser.add_argument(
        "--extra-folds",
        type=int,
        default=0,
        help="experiment: hold out more measured pairs in N more second trainings and pool "
        "them for the weight (row 'FCR shrunk (K-fold w)')",
    )
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help="experiment: FCRModel arguments other than the defaults, as JSON",
    )
    parser.add_argument(
        "--plan-kwargs",
        type=json.loads,
        default={},
        help="experiment: training-plan arguments (loss weights, ...) other than the "
        "defaults, as JSON (both trainings)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread per process; run seeds side by side
    if args.combine:
        parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in args.combine]
        rows = pd.DataFrame([r for p in parts for r in p["per_seed"]])
        weights = pd.DataFrame([r for p in parts for r in p["weights_per_seed"]])
        command = "python benchmarks/validated_blend.py --combine " + " ".join(args.combine)
        _write(args.name, command, rows, weights)
        return
    command = (
        "python benchmarks/validated_blend.py --tasks "
        + " ".join(args.tasks)
        + " --seeds "
        + " ".join(map(str, args.seeds))
        + f" --name {args.name}"
        + (f" --extra-folds {args.extra_folds}" if args.extra_folds else "")
        + (f" --model-kwargs '{json.dumps(args.model_kwargs)}'" if args.model_kwargs else "")
        + (f" --plan-kwargs '{json.dumps(args.plan_kwargs)}'" if args.plan_kwargs else "")
    )
    results = []
    for seed in args.seeds:
        for task in args.tasks:
            results.append(
                run(task, seed, args.epochs, args.extra_folds, args.model_kwargs, args.plan_kwargs)
            )
            rows = pd.concat([r for r, _ in results], ignore_index=True)
            _write(args.name, command, rows, pd.DataFrame([i for _, i in results]))


def _write(name: str, command: str, rows: pd.DataFrame, weights: pd.DataFrame):
    summary, weight_table = summarise(rows, weights)
    write_results(
        name,
        command,
        {
            "title": "FCR shrunk towards a baseline by a validated weight",
            "description": (
                "Held-out pairs; FCR defaults; scores averaged over each task's held-out "
                "groups. 'FCR shrunk (validated w)' = w FCR + (1 - w) baseline (the model's "
                "shrinkage target: 'context-adjusted additive' in runs since the context "
                "adjustment, else 'additive') with w chosen on pairs held out inside the "
                "training data; 'blend (oracle w)' chooses w on the test pairs (a ceiling, "
                "not a method)."
            ),
            "notes": [],
        },
        {
            "summary": summary,
            "weights": weight_table,
            "per_seed": rows.round(4),
            "weights_per_seed": weights,
        },
    )


if __name__ == "__main__":
    main()
