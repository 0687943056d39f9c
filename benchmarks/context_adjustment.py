"""The context-adjusted additive baseline against the additive one, on every split of the real
screens (not only the held-out pairs of ``realdata.py``).

``fcr_tools.baselines.ContextAdjustedBaseline`` (the target FCR's predictions of unmeasured
pairs shrink towards) was found on the glioblastoma held-out patients of ``realdata.py``. To
see whether it holds beyond that one split, each split here holds out other pairs and both
baselines, fitted on the rest, predict them from the held-out context's training controls:

* ``glioblastoma``: the panobinostat cells of every pair of the 5 patients (10 splits);
* ``gxe``: every (cell line, knockdown) pair of sci-Plex-GxE CRISPRi, one at a time (27 splits).

No model is trained; the slope of the adjustment is fitted on each split's training data.

Run from the repository root (seconds):
    python benchmarks/context_adjustment.py
Writes benchmarks/results/context_adjustment.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pandas as pd
from _common import write_results

from fcr_tools.baselines import AdditiveBaseline, ContextAdjustedBaseline
from fcr_tools.data import glioblastoma_panobinostat, sciplex_gxe
from fcr_tools.metrics import score_heldout_groups

SCORES = ["r2_all", "r2_deg20", "pearson_delta_deg20"]


def _splits(task: str):
    """(data, keys, list of held-out pair sets) of a task."""
    if task == "glioblastoma":
        adata = glioblastoma_panobinostat()
        keys = {"treatment_key": "treatment", "covariate_keys": "patient"}
        control = "DMSO"
        patients = sorted(adata.obs["patient"].astype(str).unique())
        held = [
            {(p, "panobinostat") for p in pair} for pair in itertools.combinations(patients, 2)
        ]
    else:
        adata = sciplex_gxe()
        keys = {"treatment_key": "perturbation", "covariate_keys": "cell_line"}
        control = "control"
        pairs = adata.obs[["cell_line", "perturbation"]].astype(str).drop_duplicates()
        held = [{pair} for pair in map(tuple, pairs.to_numpy()) if pair[1] != control]
    return adata, keys, control, sorted(held, key=sorted)


def run(task: str) -> pd.DataFrame:
    adata, keys, control, splits = _splits(task)
    tk, ck = keys["treatment_key"], keys["covariate_keys"]
    labels = list(zip(adata.obs[ck].astype(str), adata.obs[tk].astype(str), strict=True))
    rows = []
    for held in splits:
        holdout = np.array([label in held for label in labels])
        adata.obs["split"] = np.where(holdout, "holdout", "train")
        train = adata[~holdout].copy()
        additive = AdditiveBaseline(train, tk, ck, control_treatment=control)
        adjusted = ContextAdjustedBaseline.from_group_means(additive._means)
        predictors = {"additive": additive, "context-adjusted": adjusted}
        table = score_heldout_groups(predictors, adata, tk, ck, control_treatment=control)
        means = table.groupby("method", sort=False)[SCORES].mean()
        for method, scores in means.iterrows():
            rows.append(
                {
                    "task": task,
                    "held_out": "; ".join(":".join(pair) for pair in sorted(held)),
                    "slope": round(adjusted.slope, 4),
                    "method": method,
                    **scores.to_dict(),
                }
            )
    return pd.DataFrame(rows)


def summarise(per_split: pd.DataFrame) -> pd.DataFrame:
    wide = per_split.pivot_table(index=["task", "held_out"], columns="method", values=SCORES)
    out = []
    for task, part in wide.groupby(level="task", sort=False):
        row = {"task": task, "n_splits": len(part)}
        for score in SCORES:
            add, adj = part[(score, "additive")], part[(score, "context-adjusted")]
            row[f"{score}_additive"] = add.mean()
            row[f"{score}_adjusted"] = adj.mean()
            row[f"{score}_adjusted_better"] = int((adj > add).sum())
        slopes = per_split[per_split["task"] == task]["slope"]
        row["slope_min"], row["slope_max"] = slopes.min(), slopes.max()
        out.append(row)
    return pd.DataFrame(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["glioblastoma", "gxe"])
    parser.add_argument("--name", default="context_adjustment")
    args = parser.parse_args(argv)
    per_split = pd.concat([run(task) for task in args.tasks], ignore_index=True)
    summary = summarise(per_split)
    print(summary.round(3).to_string())
    write_results(
        args.name,
        "python benchmarks/context_adjustment.py"
        + (f" --name {args.name}" * (args.name != "context_adjustment")),
        {
            "title": "Context-adjusted vs additive baseline on every split of the real screens",
            "description": (
                "Each split holds out the treated cells of some (context, treatment) pairs; "
                "both baselines, fitted on the rest, predict them from the held-out "
                "context's training controls. Scores averaged over a split's held-out groups; "
                "summary: mean over splits and in how many splits the context-adjusted "
                "baseline scores higher. slope: the adjustment's, fitted on each split."
            ),
        },
        {"summary": summary, "per_split": per_split.round(4)},
    )


if __name__ == "__main__":
    main()
