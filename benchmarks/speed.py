"""Speed and memory: FCR against scVI of the same width, latent size and batch size.

Three screens: the demo's simulated screen (about 4,600 cells x 200 genes), the bundled
sci-Plex-GxE real screen (2,586 cells x 500 genes) and a simulated screen of 19,800 cells x
2,000 genes (sparse counts). On each, FCR and scVI train a few epochs, each in its own
process (so that peak memory is its own) and one after the other (never two at once); the
table gives seconds per epoch and per step (median of the epochs after the first), the
FCR / scVI ratio, inference throughput and peak RSS. On the large screen also FCR without
discriminators and FCR with the NB likelihood, and prediction: ``predict_counterfactual``
on a new AnnData of 1,667 control cells, and a grid of 50 (treatment, dose) targets on
them with ``predict_grid`` against 50 separate calls. A torch.profiler table of FCR
training steps on the demo screen, with the share of the step spent in the model's own
arithmetic (forward, backward, optimiser steps, timed without Lightning), goes to
results/speed_profile.txt.

Run from the repository root:  python benchmarks/speed.py [--quick] [--accelerator cpu]
Writes benchmarks/results/speed.{json,md} (speed_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results

HERE = Path(__file__).resolve()
SIM_SETUP = {"treatment_key": "drug", "dose_key": "dose", "covariate_keys": "cell_line"}
GRID_TARGETS = 50  # 10 treatments x 5 doses
PREDICTION_COLUMNS = [
    "prediction_new_cells",
    "counterfactual_new_cells_per_second",
    "grid_targets",
    "separate_calls_seconds",
    "grid_cells_seconds",
    "grid_mean_seconds",
    "grid_cells_speedup",
    "grid_mean_speedup",
]


def make_data(screen: str, quick: bool):
    """The screen's AnnData and its setup_anndata arguments."""
    from fcr_tools.data import sciplex_gxe, simulate_screen

    if screen == "demo":
        from fcr_tools._demo import DEMO_SETTINGS

        settings = DEMO_SETTINGS["quick" if quick else "full"]["screen"]
        adata = simulate_screen(**settings, seed=0)
        return adata[adata.obs["split"] == "train"].copy(), SIM_SETUP
    if screen == "GxE":
        adata = sciplex_gxe()  # log-normalised only: scVI gets rounded expm1 values (timing)
        adata.layers["counts"] = np.round(np.expm1(adata.X))
        setup = {"treatment_key": "perturbation", "covariate_keys": "cell_type"}
        return adata, {**setup, "control_treatment": "control"}
    sizes = dict(n_cell_lines=3, n_treatments=4, n_cells_per_condition=30, n_genes=200)
    if not quick:
        sizes = dict(
            n_cell_lines=5,
            n_treatments=10,
            doses=(0.1, 0.3, 1.0),
            n_cells_per_condition=120,
            n_genes=2000,
            n_latent_x=8,
            n_latent_t=8,
            n_latent_tx=8,
        )
    return simulate_screen(**sizes, as_sparse=True, seed=0), SIM_SETUP


# FCRModel arguments per screen (the demo's model on the demo's screen, defaults elsewhere);
# scVI gets the same width, depth and total latent size
MODEL_KWARGS = {"demo": {"n_latent_x": 8, "n_latent_t": 8, "n_latent_tx": 8}, "GxE": {}}
SCREENS = ["demo", "GxE", "large"]


class EpochTimer:
    """Lightning callback recording the wall time of every training epoch."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _Timer(Callback):
            def __init__(self):
                self.times = []

            def on_train_epoch_start(self, trainer, pl_module):
                self._start = time.perf_counter()

            def on_train_epoch_end(self, trainer, pl_module):
                self.times.append(time.perf_counter() - self._start)

        return _Timer()


def _rss_mb(field: str = "VmHWM") -> float:
    """Resident memory of this process in MiB: ``VmHWM`` (peak) or ``VmRSS`` (now)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, no reset


def _reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _best_seconds(call, repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def prediction_speed(model, adata, setup: dict) -> dict:
    """Throughput of predict_counterfactual on new cells, and a grid against separate calls.

    The grid: the first 10 treatments x 5 doses (``GRID_TARGETS`` = 50 targets).
    """
    control = setup.get("control_treatment", "control")
    labels = adata.obs[setup["treatment_key"]]
    treatments = [t for t in labels.cat.categories if t != control][:10]
    doses = [0.1, 0.2, 0.3, 0.5, 1.0]
    controls = adata[labels == control]
    new = controls[: min(1667, controls.n_obs)].copy()
    # every call gets an AnnData object the model has not seen (made before timing: copying
    # is the user's cost, not prediction's)
    fresh = iter([new.copy() for _ in range(40)])

    def one_call():
        model.predict_counterfactual(next(fresh), treatment=treatments[0], dose=1.0)

    def separate():
        data = next(fresh)
        for treatment in treatments:
            for dose in doses:
                model.predict_counterfactual(data, treatment=treatment, dose=dose)

    def grid(aggregate):
        return lambda: model.predict_grid(
            next(fresh), treatment=treatments, dose=doses, aggregate=aggregate
        )

    apart = _best_seconds(separate, repeats=1)
    cells = _best_seconds(grid("cells"), repeats=1)
    mean = _best_seconds(grid("mean"), repeats=1)
    return {
        "prediction_new_cells": new.n_obs,
        # median of 30 calls: single calls of ~50 ms vary by 20% on a shared machine
        "counterfactual_new_cells_per_second": new.n_obs / _best_seconds(one_call, repeats=30),
        "grid_targets": len(treatments) * len(doses),
        "separate_calls_seconds": apart,
        "grid_cells_seconds": cells,
        "grid_mean_seconds": mean,
        "grid_cells_speedup": apart / cells,
        "grid_mean_speedup": apart / mean,
    }


def run_method(method: str, screen: str, data: str, epochs: int, accelerator: str) -> dict:
    """Train one method on one screen and time it (in its own process, data read from file)."""
    import anndata as ad
    import scvi
    import torch

    from fcr_tools import FCRModel

    scvi.settings.seed = 0
    adata = ad.read_h5ad(data)
    setup = json.loads(adata.uns.pop("speed_setup"))
    rss_data = _rss_mb("VmRSS")
    _reset_peak_rss()  # the peak below is that of training and inference, data included
    timer = EpochTimer()
    kwargs = dict(
        max_epochs=epochs,
        enable_progress_bar=False,
        callbacks=[timer],
        accelerator=accelerator,
        check_val_every_n_epoch=None,
    )
    model_kwargs = MODEL_KWARGS.get(screen, {})
    n_hidden = model_kwargs.get("n_hidden", 128)
    n_latent = sum(model_kwargs.get(f"n_latent_{b}", 16) for b in ("x", "t", "tx"))
    counterfactual, predictions = None, {}
    if method == "scVI":
        scvi.model.SCVI.setup_anndata(adata, layer="counts", categorical_covariate_keys=None)
        model = scvi.model.SCVI(adata, n_latent=n_latent, n_hidden=n_hidden, n_layers=2)
        model.train(batch_size=256, train_size=1.0, **kwargs)
    else:
        likelihood = "nb" if "NB" in method else "gaussian"
        FCRModel.setup_anndata(adata, layer="counts" if likelihood == "nb" else None, **setup)
        model = FCRModel(adata, likelihood=likelihood, **model_kwargs)
        plan = {"adversarial_weight": 0.0} if "without discriminators" in method else {}
        model.train(batch_size=256, train_size=1.0, plan_kwargs=plan, shrinkage=False, **kwargs)

        def counterfactual():
            treatment = model.treatment_encoder.components[0]
            return model.predict_counterfactual(treatment=treatment, batch_size=1024)

    steps = model.trainer.num_training_batches
    epoch_seconds = float(np.median(timer.times[1:] if len(timer.times) > 1 else timer.times))
    train_peak = _rss_mb()
    _reset_peak_rss()
    model.module.eval()
    latent_rate = adata.n_obs / _best_seconds(
        lambda: model.get_latent_representation(batch_size=1024)
    )
    cf_rate = float("nan")
    if counterfactual is not None:
        cf_rate = adata.n_obs / _best_seconds(counterfactual)
        if method == "FCR" and screen == "large":
            predictions = prediction_speed(model, adata, setup)
    return {
        "screen": screen,
        "method": method,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "steps_per_epoch": int(steps),
        "seconds_per_epoch": epoch_seconds,
        "ms_per_step": 1000 * epoch_seconds / steps,
        "train_cells_per_second": adata.n_obs / epoch_seconds,
        "latent_cells_per_second": latent_rate,
        "counterfactual_cells_per_second": cf_rate,
        "rss_after_loading_data_mb": rss_data,
        "training_peak_minus_data_mb": train_peak - rss_data,
        "inference_peak_minus_data_mb": _rss_mb() - rss_data,
        "torch_threads": torch.get_num_threads(),
        **predictions,
    }


def _bare_step_ms(model, n_epochs: int = 3) -> float:
    """Milliseconds per training step of the model's own arithmetic, without Lightning.

    Forward pass and objective, backward pass, gradient clipping and the Adam steps of the
    autoencoder and the discriminators, on the same paired minibatches.
    """
    import torch

    from fcr_tools._pairing import FCRDataLoader

    module = model.module
    module.train()
    loader = FCRDataLoader(model.adata_manager, batch_size=256, shuffle=True, pair_controls=True)
    batches = list(loader)
    disc = {id(p) for p in module.discriminators.parameters()}
    ae_params = [p for p in module.parameters() if id(p) not in disc]
    ae = torch.optim.Adam(ae_params, lr=1e-4, eps=0.01, fused=True)
    discriminator = torch.optim.Adam(
        module.discriminators.parameters(), lr=1e-4, eps=0.01, fused=True
    )

    def step(batch):
        inference, _, loss = module(batch, loss_kwargs={"kl_weight": 1.0})
        ae.zero_grad()
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(ae_params, 50.0)
        ae.step()
        disc_loss, _ = module.discriminator_loss(inference)
        discriminator.zero_grad()
        disc_loss.backward()
        torch.nn.utils.clip_grad_norm_(module.discriminators.parameters(), 50.0)
        discriminator.step()

    for batch in batches[:3]:
        step(batch)
    start = time.perf_counter()
    for _ in range(n_epochs):
        for batch in batches:
            step(batch)
    return 1000 * (time.perf_counter() - start) / (n_epochs * len(batches))


def _profile_one_epoch(model, n_steps: int, **train_kwargs):
    """torch.profiler over ``n_steps`` training steps of one epoch, and the steps it saw.

    The profile covers the training steps only, not what ``train()`` does after them (FCR's
    alignment of z_tx's axes).
    """
    from lightning.pytorch.callbacks import Callback
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)

    class _StepsOnly(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            prof.start()

        def on_train_epoch_end(self, trainer, pl_module):
            prof.stop()

    model.train(
        max_epochs=1,
        enable_progress_bar=False,
        train_size=1.0,
        batch_size=256,
        limit_train_batches=n_steps,
        callbacks=[_StepsOnly()],
        check_val_every_n_epoch=None,
        **train_kwargs,
    )
    return prof, model.trainer.num_training_batches


def _operations_per_step(prof, steps: int) -> dict:
    """Linear layers (``aten::addmm`` calls, forward) and all aten operations per step."""
    events = prof.key_averages()
    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    addmm = sum(e.count for e in events if e.key == "aten::addmm")
    return {"linear_layers_per_step": addmm / steps, "aten_operations_per_step": aten / steps}


def profile_fcr(quick: bool, out: Path, n_steps: int = 20) -> dict:
    """torch.profiler table of FCR training steps on the demo screen, and the arithmetic share.

    The share is the bare step time (:func:`_bare_step_ms`) over the Lightning step time.
    The operations per step of FCR and of scVI (the same width, depth and total latent size,
    as in the timings) are counted on the same screen.
    """
    import scvi

    from fcr_tools import FCRModel

    scvi.settings.seed = 0
    adata, setup = make_data("demo", quick)
    FCRModel.setup_anndata(adata, **setup)
    model = FCRModel(adata, **MODEL_KWARGS["demo"])
    timer = EpochTimer()
    model.train(
        max_epochs=4,
        enable_progress_bar=False,
        train_size=1.0,
        callbacks=[timer],
        check_val_every_n_epoch=None,
        shrinkage=False,
    )
    steps = model.trainer.num_training_batches
    lightning_ms = 1000 * float(np.median(timer.times[1:])) / steps
    prof, profiled_steps = _profile_one_epoch(model, n_steps, shrinkage=False)
    bare_ms = _bare_step_ms(model)
    fcr_ops = _operations_per_step(prof, profiled_steps)

    scvi.settings.seed = 0
    scvi_data, _ = make_data("demo", quick)
    scvi.model.SCVI.setup_anndata(scvi_data, layer="counts")
    n_latent = sum(MODEL_KWARGS["demo"][f"n_latent_{b}"] for b in ("x", "t", "tx"))
    scvi_model = scvi.model.SCVI(scvi_data, n_latent=n_latent, n_hidden=128, n_layers=2)
    scvi_model.train(max_epochs=1, enable_progress_bar=False, train_size=1.0, batch_size=256)
    scvi_prof, scvi_steps = _profile_one_epoch(scvi_model, n_steps)
    scvi_ops = _operations_per_step(scvi_prof, scvi_steps)

    share = {
        "lightning_ms_per_step": lightning_ms,
        "bare_ms_per_step": bare_ms,
        "arithmetic_share": bare_ms / lightning_ms,
        **{f"fcr_{k}": v for k, v in fcr_ops.items()},
        **{f"scvi_{k}": v for k, v in scvi_ops.items()},
    }
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
    out.write_text(
        f"FCR training on the demo screen {adata.shape}, batch 256.\n"
        f"One step through Lightning (median epoch / steps): {lightning_ms:.1f} ms; the "
        f"model's own arithmetic (forward, backward, clipping, both Adam steps, no Lightning):"
        f" {bare_ms:.1f} ms; arithmetic share {bare_ms / lightning_ms:.2f}.\n"
        f"Operations per step (torch.profiler, {profiled_steps} steps each): FCR "
        f"{fcr_ops['linear_layers_per_step']:.0f} linear layers (forward), "
        f"{fcr_ops['aten_operations_per_step']:.0f} aten operations; scVI of the same width, "
        f"depth and latent size {scvi_ops['linear_layers_per_step']:.0f} and "
        f"{scvi_ops['aten_operations_per_step']:.0f}.\n\n"
        f"torch.profiler, {profiled_steps} FCR steps through Lightning:\n\n{table}\n"
    )
    return share


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--name", default="speed", help="result file name (default speed)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--screen", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    if args.worker:
        row = run_method(args.worker, args.screen, args.data, args.epochs, args.accelerator)
        print(json.dumps(row))
        return
    if args.profile:
        share = profile_fcr(args.quick, RESULTS / f"speed_profile{suffix}.txt")
        print(json.dumps(share))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for screen in SCREENS:
            adata, setup = make_data(screen, args.quick)
            adata.uns["speed_setup"] = json.dumps(setup)
            data = str(Path(tmp) / f"{screen}.h5ad")
            adata.write_h5ad(data)  # once, so every worker starts from the file
            methods = ["FCR", "scVI"]
            if screen == "large":
                methods = ["FCR", "FCR without discriminators", "FCR (NB likelihood)", "scVI"]
            for method in methods:
                cmd = [sys.executable, str(HERE), "--worker", method, "--screen", screen]
                cmd += ["--data", data, "--epochs", str(args.epochs)]
                cmd += ["--accelerator", args.accelerator]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    cmd = [sys.executable, str(HERE), "--profile"] + (["--quick"] if args.quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    share = json.loads(done.stdout.strip().splitlines()[-1])
    table = pd.DataFrame(rows)
    scvi_epoch = table[table.method == "scVI"].set_index("screen")["seconds_per_epoch"]
    ratio = table["seconds_per_epoch"] / table.screen.map(scvi_epoch)
    table.insert(6, "epoch_time_vs_scVI", ratio)
    has_prediction = table[PREDICTION_COLUMNS[0]].notna()
    prediction = table.loc[has_prediction, ["screen", "method", *PREDICTION_COLUMNS]]
    table = table.drop(columns=PREDICTION_COLUMNS)
    flags = (" --quick" if args.quick else "") + (f" --name {args.name}" * (args.name != "speed"))
    write_results(
        args.name + suffix,
        "python benchmarks/speed.py" + flags,
        {
            "title": "Speed and memory",
            "description": (
                f"Each method trains {args.epochs} epochs (median epoch time after the first; "
                "no validation; batch size 256) in its own process, one after the other, "
                "reading the same h5ad. ratio = FCR / scVI epoch time on the same screen. "
                "FCR: default settings (16/16/16 latents, width 128, 2 layers; Gaussian on "
                "log-normalised X unless NB) except the demo screen, where the demo's model "
                "(8/8/8 latents); scVI: the same width and depth, n_latent = FCR's total "
                "latent size, NB on counts. Memory: rss_after_loading_data_mb is the process "
                "right after reading the data (imports included); training_ / "
                "inference_peak_minus_data_mb what the peak RSS during training / during the "
                "inference calls adds to it (Linux VmHWM). Inference throughput with batch "
                "size 1024 (median of 3 calls after a warm-up). Prediction (large screen): "
                "predict_counterfactual on control cells (median of 30 calls after a warm-up, "
                "each on an AnnData object the model has not seen, copied before timing), "
                f"and a grid of {GRID_TARGETS} (treatment, dose) targets on "
                "those cells: predict_grid with aggregate='cells' (every cell x target) and "
                "'mean' (one row per cell line x target) against one predict_counterfactual "
                "call per target. Profile: "
                f"results/speed_profile{suffix}.txt (demo screen): a Lightning step "
                f"{share['lightning_ms_per_step']:.1f} ms, the model's own arithmetic "
                f"{share['bare_ms_per_step']:.1f} ms (share "
                f"{share['arithmetic_share']:.2f}); per step FCR runs "
                f"{share['fcr_linear_layers_per_step']:.0f} linear layers and "
                f"{share['fcr_aten_operations_per_step']:.0f} aten operations, scVI "
                f"{share['scvi_linear_layers_per_step']:.0f} and "
                f"{share['scvi_aten_operations_per_step']:.0f}."
            ),
            "profile": share,
        },
        {"results": table, "prediction": prediction},
    )


if __name__ == "__main__":
    main()
