"""How identifiable z_tx is as its variance contrasts across conditions grow.

z_tx's axes are identifiable (iVAE-style) only through how its diagonal conditional prior
changes across (cell line, treatment) conditions. ``simulate_screen(interaction_sd_range=...)``
sets the range of the per-condition sds of z_tx (controls have sd 1); the default
``(0.3, 1.5)`` gives weak contrasts.

- **Part A (analytic, no training): check the screen before training.** For a grid of
  ``interaction_sd_range`` values and screen sizes, the rotation cost of
  ``identifiability_signal.rotation_cost``: the nats per cell the likelihood loses when the
  true z_tx is replaced by a randomly rotated copy under the best diagonal prior (mean over
  Haar-random rotations). That is all the signal the data carry about z_tx's axes; a screen
  worth training on has about 0.5 nat per cell or more. Also the MCC of the
  condition-means-only oracle (below), which needs no training either.
- **Part B (training).** FCR (``FCRModel`` defaults, Gaussian likelihood on log-normalised X,
  latent sizes equal to the simulator's) on a few screens, scored like
  ``identifiability.py`` (``score_blocks``: MCC of z_tx, block R2, leakage), with two
  reference lines:

  - *condition-means-only oracle*: every cell's z_tx replaced by the true mean of z_tx in
    its condition (the simulator's conditional mean); the MCC of that against the true z_tx
    is what knowing only each cell's condition (and the true axes) gives;
  - *supervised reference* of ``identifiability.py``: an MLP shown the true latents (70% of
    the cells) predicting them from expression and condition (scored on the other 30%).

Run from the repository root:
    python benchmarks/identifiability_curve.py [--part A|B|both] [--quick] [--jobs 2]
Writes benchmarks/results/identifiability_curve.{json,md} (``--part A`` / ``--part B`` alone:
identifiability_curve_partA / _partB; ``--quick`` adds ``_quick``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_model_arguments, mean_sd, model_flags, train_fcr, write_results
from identifiability import (
    BLOCKS,
    SCREEN,
    SETUP,
    SUPERVISED,
    score_blocks,
    supervised_reference,
)
from identifiability_signal import rotation_cost, simulator_laws

from fcr_tools.data import simulate_screen
from fcr_tools.metrics import block_r2, mean_corr_coef

NAME = "identifiability_curve"
TARGET = 0.5  # nats per cell of rotation cost that a screen should reach
BASE_SCREEN = SCREEN  # the identifiability benchmark's screen (simulate_screen's defaults)
RANGES = [(0.3, 1.5), (0.2, 2.0), (0.1, 3.0), (0.05, 5.0)]  # the first is today's default
SIZES = [(4, 6), (6, 8)]  # (cell lines, drugs); 3 doses each
B_SCREENS = [  # overrides of BASE_SCREEN
    {},
    {"interaction_sd_range": (0.05, 5.0), "n_cells_per_condition": 60},
    {"interaction_sd_range": (0.05, 5.0), "n_cells_per_condition": 200},
]
QUICK_SCREEN = {"n_cell_lines": 2, "n_treatments": 3, "n_cells_per_condition": 15, "n_genes": 40}
QUICK_B_SCREENS = [
    {},
    {"interaction_sd_range": (0.05, 5.0), "n_cells_per_condition": 10},
    {"interaction_sd_range": (0.05, 5.0), "n_cells_per_condition": 20},
]
FCR = "FCR"
ORACLE = "condition-means-only oracle"
METHODS = [FCR, ORACLE, SUPERVISED]
DEFAULT_RANGE = (0.3, 1.5)


# ---------------------------------------------------------------------- helpers
def _limit_threads() -> None:
    """One thread per process: the jobs run side by side on a few cores."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def describe(screen: dict) -> dict:
    """The columns that name a screen in the tables."""
    lo, hi = screen.get("interaction_sd_range", DEFAULT_RANGE)
    n_lines, n_drugs = screen["n_cell_lines"], screen["n_treatments"]
    n_doses = len(screen["doses"])
    return {
        "interaction_sd_range": f"({lo:g}, {hi:g})",
        "size": f"{n_lines} x {n_drugs} x {n_doses}",
        # conditions including one control per cell line
        "n_conditions": n_lines * (n_drugs * n_doses + 1),
        "cells_per_condition": screen["n_cells_per_condition"],
    }


def condition_means_oracle(adata) -> float:
    """MCC of the true conditional mean of z_tx (per cell's condition) against the true z_tx."""
    sim, cell_line, h = simulator_laws(adata)
    mean, _ = sim.law_tx(cell_line, h)
    return mean_corr_coef(mean, adata.obsm["z_tx_true"])


def log_sd_spread(adata) -> float:
    """Sd over cells of log sd(z_tx | condition), pooled over the components."""
    sim, cell_line, h = simulator_laws(adata)
    _, sd = sim.law_tx(cell_line, h)
    return float(np.log(sd).std())


# ---------------------------------------------------------------------- part A
def run_a(screen: dict, seed: int, n_rotations: int) -> dict:
    _limit_threads()
    adata = simulate_screen(**screen, seed=seed)
    scores = rotation_cost(adata, n_rotations, seed)
    scores["log_sd_spread"] = log_sd_spread(adata)
    scores["mcc_condition_means_oracle"] = condition_means_oracle(adata)
    return {"part": "A", **describe(screen), "seed": seed, "n_cells": adata.n_obs, **scores}


# ---------------------------------------------------------------------- part B
def run_b(
    screen: dict, seed: int, method: str, epochs: int, n_rotations: int, model_kwargs, plan_kwargs
) -> dict:
    _limit_threads()
    adata = simulate_screen(**screen, seed=seed)
    row = {"part": "B", **describe(screen), "seed": seed, "n_cells": adata.n_obs}
    start = time.perf_counter()
    if method == FCR:
        dims = {f"n_latent_{b}": screen[f"n_latent_{b}"] for b in BLOCKS}
        model, _ = train_fcr(
            adata,
            SETUP,
            {**dims, **(model_kwargs or {})},
            dict(plan_kwargs or {}),
            epochs,
            seed,
            shrinkage=False,
        )
        blocks = {b: model.get_latent_representation(block=b) for b in BLOCKS}
        scores = score_blocks(blocks, adata)
        # where the true z_tx went: how much of it the learned z_t holds, and all three
        # learned blocks together (r2_tx is the learned z_tx alone)
        true_tx = adata.obsm["z_tx_true"]
        scores["r2_tx_from_t"] = block_r2(blocks["t"], true_tx)
        scores["r2_tx_from_all"] = block_r2(np.hstack([blocks[b] for b in BLOCKS]), true_tx)
        # z_tx in the module's own axes (before the rotation that train() chose), and the
        # total correlation within conditions that the rotation removed
        axes = model.interaction_axes_
        if axes is not None:
            own = blocks["tx"] @ axes["rotation"]  # undo z @ R.T
            scores["mcc_tx_module_axes"] = mean_corr_coef(own, adata.obsm["z_tx_true"])
            scores["total_correlation"] = axes["total_correlation"]
            scores["total_correlation_aligned"] = axes["total_correlation_aligned"]
        row["epochs"] = epochs
    elif method == SUPERVISED:
        scores = supervised_reference(adata, seed)
    elif method == ORACLE:
        scores = {"mcc_tx": condition_means_oracle(adata)}
        # the screen's own signal, for reading the MCCs against (analytic, as in part A)
        scores["rotation_cost"] = rotation_cost(adata, n_rotations, seed)["rotation_cost_mean"]
    else:
        raise ValueError(f"unknown method {method!r}")
    row["seconds"] = time.perf_counter() - start
    return {**row, "method": method, **scores}


# ---------------------------------------------------------------------- driver
def _run_all(tasks: list[tuple], jobs: int) -> list[dict]:
    """Run ``(function, args)`` tasks, ``jobs`` processes at a time; print each row."""
    rows = []

    def show(row):
        keep = ["part", "method", "interaction_sd_range", "size", "cells_per_condition", "seed"]
        keep += ["seconds", "mcc_tx", "rotation_cost_mean"]
        short = {k: row[k] for k in keep if k in row}
        print(pd.DataFrame([short]).round(3).to_string(header=False, index=False), flush=True)

    if jobs <= 1:
        for function, args in tasks:
            rows.append(function(*args))
            show(rows[-1])
        return rows
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(function, *args) for function, args in tasks]
        for future in as_completed(futures):
            rows.append(future.result())
            show(rows[-1])
    return rows


def _parse_ranges(text: str) -> list[tuple[float, float]]:
    ranges = [tuple(float(v) for v in pair) for pair in json.loads(text)]
    if not all(len(r) == 2 for r in ranges):
        raise argparse.ArgumentTypeError("--ranges takes a JSON list of [low, high] pairs")
    return ranges


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = [tuple(int(v) for v in pair) for pair in json.loads(text)]
    if not all(len(s) == 2 for s in sizes):
        raise argparse.ArgumentTypeError("--sizes takes a JSON list of [cell lines, drugs] pairs")
    return sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["A", "B", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=150, help="FCR epochs (part B)")
    parser.add_argument("--rotations", type=int, default=200, help="random rotations per seed")
    parser.add_argument("--jobs", type=int, default=2, help="processes run in parallel")
    parser.add_argument(
        "--ranges",
        type=_parse_ranges,
        default=None,
        help=f"part A: interaction_sd_range values as JSON, default {json.dumps(RANGES)}",
    )
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=None,
        help=f"part A: [cell lines, drugs] pairs as JSON, default {json.dumps(SIZES)}",
    )
    parser.add_argument(
        "--screen",
        type=json.loads,
        default=None,
        help="simulate_screen arguments as JSON that override the base screen of both parts, "
        'e.g. \'{"interaction_rank": null, "doses": [1, 3, 10]}\'',
    )
    parser.add_argument(
        "--b-screens",
        type=json.loads,
        default=None,
        help="part B: JSON list of simulate_screen arguments overriding the base screen "
        f"{BASE_SCREEN}; default {json.dumps(B_SCREENS)}",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"part B: comma-separated subset of {METHODS} (default all)",
    )
    add_model_arguments(parser, NAME)
    args = parser.parse_args(argv)

    base = dict(BASE_SCREEN)
    ranges = args.ranges or RANGES
    sizes = args.sizes or SIZES
    b_screens = args.b_screens if args.b_screens is not None else B_SCREENS
    seeds, epochs, rotations = list(range(args.seeds)), args.epochs, args.rotations
    if args.quick:
        base.update(QUICK_SCREEN)
        ranges = args.ranges or [RANGES[0], RANGES[-1]]
        sizes = args.sizes or [(2, 2), (2, 3)]
        b_screens = args.b_screens if args.b_screens is not None else QUICK_B_SCREENS
        seeds, epochs, rotations = [0], 2, 5
    if args.screen:
        base.update(args.screen)
        if "doses" in args.screen:
            base["doses"] = tuple(base["doses"])
    methods = METHODS
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",")]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {METHODS}")

    tasks = []
    if args.part in ("A", "both"):
        for n_lines, n_drugs in sizes:
            for sd_range in ranges:
                screen = {
                    **base,
                    "n_cell_lines": n_lines,
                    "n_treatments": n_drugs,
                    "interaction_sd_range": tuple(sd_range),
                }
                tasks += [(run_a, (screen, seed, rotations)) for seed in seeds]
    b_tasks = []
    if args.part in ("B", "both"):
        for override in b_screens:
            screen = {**base, **override}
            if "interaction_sd_range" in screen:
                screen["interaction_sd_range"] = tuple(screen["interaction_sd_range"])
            for seed in seeds:
                for method in methods:
                    b_tasks.append(
                        (
                            run_b,
                            (
                                screen,
                                seed,
                                method,
                                epochs,
                                rotations,
                                args.model_kwargs,
                                args.plan_kwargs,
                            ),
                        )
                    )
    # longest first (FCR on the most cells), so that the processes finish together
    cost = {FCR: 100.0, SUPERVISED: 10.0, ORACLE: 0.0}
    b_tasks.sort(key=lambda task: -cost[task[1][2]] * task[1][0]["n_cells_per_condition"])
    rows = _run_all(tasks + b_tasks, args.jobs)

    results = pd.DataFrame(rows)
    tables = {}
    screen_cols = ["interaction_sd_range", "size", "n_conditions"]
    if args.part in ("A", "both"):
        part_a = results[results["part"] == "A"].dropna(axis=1, how="all")
        order = {f"({lo:g}, {hi:g})": i for i, (lo, hi) in enumerate(ranges)}
        part_a = part_a.sort_values(
            ["size", "interaction_sd_range", "seed"],
            key=lambda c: c.map(order) if c.name == "interaction_sd_range" else c,
        )
        cols = [
            "rotation_cost_mean",
            "cheapest_cost_mcc_below_0.8",
            "mcc_rotated_truth_mean",
            "log_sd_spread",
            "z_tx_sd_min",
            "z_tx_sd_max",
            "mcc_condition_means_oracle",
        ]
        summary = mean_sd(part_a, ["size", "interaction_sd_range", "n_conditions"], cols)
        means = part_a.groupby(["size", "interaction_sd_range"], sort=False)[
            "rotation_cost_mean"
        ].mean()
        summary.insert(3, f"meets_{TARGET}_nat", (means.to_numpy() >= TARGET).tolist())
        tables["part_A_rotation_cost_(nats_per_cell,_mean_±_sd_over_seeds)"] = summary
        tables["part_A_per_seed"] = part_a.drop(columns=["part"]).round(4)
    if args.part in ("B", "both"):
        part_b = results[results["part"] == "B"].dropna(axis=1, how="all")
        # rows in the order of the screens and methods asked for
        screen_order = {}
        for override in b_screens:
            label = describe({**base, **override})
            key = (label["interaction_sd_range"], label["size"], label["cells_per_condition"])
            screen_order.setdefault(key, len(screen_order))
        part_b = part_b.assign(
            _screen=[
                screen_order[key]
                for key in zip(
                    part_b["interaction_sd_range"],
                    part_b["size"],
                    part_b["cells_per_condition"],
                    strict=True,
                )
            ],
            _method=part_b["method"].map({m: i for i, m in enumerate(methods)}),
        )
        part_b = part_b.sort_values(["_screen", "_method", "seed"])
        part_b = part_b.drop(columns=["_screen", "_method"])
        keys = [*screen_cols, "cells_per_condition"]
        mcc = mean_sd(part_b, [*keys, "method"], ["mcc_tx"])
        curve = mcc.pivot_table(
            index=keys, columns="method", values="mcc_tx", aggfunc="first", sort=False
        )
        curve = curve[[m for m in methods if m in curve.columns]].reset_index()
        curve.columns.name = None
        if "mcc_tx_module_axes" in part_b:
            own = mean_sd(part_b[part_b["method"] == FCR], keys, ["mcc_tx_module_axes"])
            own = own.rename(columns={"mcc_tx_module_axes": f"{FCR}, module's own axes"})
            curve = curve.merge(own[[*keys, f"{FCR}, module's own axes"]], on=keys, how="left")
        if ORACLE in methods:
            cost = part_b[part_b["method"] == ORACLE]
            cost = mean_sd(cost, keys, ["rotation_cost"])[[*keys, "rotation_cost"]]
            curve = curve.merge(cost, on=keys, how="left")
        tables["part_B_z_tx_MCC_(mean_±_sd_over_seeds)"] = curve
        score_cols = [
            c
            for c in [
                "mcc_tx",
                "mcc_tx_module_axes",
                "r2_x",
                "r2_t",
                "r2_tx",
                "r2_tx_from_t",
                "r2_tx_from_all",
                "leak_x_to_t",
                "leak_t_to_x",
                "total_correlation",
                "total_correlation_aligned",
                "seconds",
            ]
            if c in part_b
        ]
        tables["part_B_all_scores"] = mean_sd(part_b, [*keys, "method"], score_cols)
        tables["part_B_per_seed"] = part_b.drop(columns=["part"]).round(4)

    command = "python benchmarks/identifiability_curve.py"
    command += f" --part {args.part}" * (args.part != "both") + " --quick" * args.quick
    command += f" --seeds {args.seeds}" * (args.seeds != 3 and not args.quick)
    command += f" --epochs {args.epochs}" * (args.epochs != 150 and not args.quick)
    command += f" --rotations {args.rotations}" * (args.rotations != 200 and not args.quick)
    for flag, value in (("screen", args.screen), ("ranges", args.ranges), ("sizes", args.sizes)):
        if value is not None:
            command += f" --{flag} '{json.dumps(value)}'"
    if args.b_screens is not None:
        command += f" --b-screens '{json.dumps(args.b_screens)}'"
    if args.methods:
        command += f" --methods '{args.methods}'"
    command += model_flags(args, NAME)
    name = args.name + ("" if args.part == "both" else f"_part{args.part}")
    name += "_quick" * args.quick
    description = (
        f"Base screen: {base}, other simulate_screen arguments at their defaults; "
        f"interaction_sd_range is the range of z_tx's per-condition sd at full dose response "
        f"(controls: sd 1; default (0.3, 1.5)). Seeds {seeds}. "
        f"Part A (no training): rotation_cost_mean is the mean over {rotations} Haar-random "
        "rotations of the nats per cell the likelihood loses when the true z_tx is rotated "
        "(total correlation of the rotated conditional prior, averaged over cells; "
        "benchmarks/identifiability_signal.py); cheapest_cost_mcc_below_0.8: the lowest cost "
        "among rotations whose MCC against the truth is below 0.8; log_sd_spread: sd over "
        "cells of log sd(z_tx | condition). The rotation cost does not depend on the cells "
        f"per condition. Target: >= {TARGET} nat per cell. "
        f"Part B: FCR with FCRModel's defaults (Gaussian likelihood on log-normalised X, model "
        f"arguments {args.model_kwargs or 'default'}, training-plan arguments "
        f"{args.plan_kwargs or 'default'}), latent sizes equal to the true ones, {epochs} "
        "epochs; mcc_tx of the learned z_tx, as get_latent_representation reports it (in "
        "the axes that train() aligned: FCRModel.align_interaction_axes), against the true one "
        "on all cells; mcc_tx_module_axes: the same in the module's own axes (no rotation); "
        "total_correlation / _aligned: within conditions, nats per cell, before / after that "
        "rotation; r2 / leak as in identifiability.py; r2_tx_from_t / r2_tx_from_all: the "
        "same regression R2 of the true z_tx from the learned z_t / from all three learned "
        f"blocks together. {ORACLE}: each cell's z_tx replaced "
        f"by the true conditional mean of its condition. {SUPERVISED}: identifiability.py's "
        "MLP shown the true latents (scored on 30% held-out cells). rotation_cost: part A's "
        "score of the same screens."
    )
    write_results(
        name,
        command,
        {
            "title": "Identifiability of z_tx against the strength of its variance contrasts",
            "description": description,
        },
        tables,
    )
    for key, table in tables.items():
        if "per_seed" not in key and "all_scores" not in key:
            print(f"\n{key}\n{table.to_string(index=False)}")


if __name__ == "__main__":
    main()
