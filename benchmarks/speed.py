"""Speed and memory: FCR vs FCR without discriminators vs scVI on the same data, same run.

One simulated screen (about 20,000 cells x 2,000 genes, sparse counts). Each method trains a
few epochs in its own process (so peak memory is its own); the table gives seconds per epoch
(median of the epochs after the first), cells per second, the FCR / scVI ratio, throughput of
``get_latent_representation`` and ``predict_counterfactual``, and peak RSS. A torch.profiler
summary of FCR training steps goes to results/speed_profile.txt.

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
SETUP = {"treatment_key": "drug", "dose_key": "dose", "covariate_keys": "cell_line"}


def make_data(quick: bool):
    from fcr_tools.data import simulate_screen

    if quick:
        return simulate_screen(
            n_cell_lines=3,
            n_treatments=4,
            n_cells_per_condition=30,
            n_genes=200,
            as_sparse=True,
            seed=0,
        )
    return simulate_screen(
        n_cell_lines=5,
        n_treatments=10,
        doses=(0.1, 0.3, 1.0),
        n_cells_per_condition=120,
        n_genes=2000,
        n_latent_x=8,
        n_latent_t=8,
        n_latent_tx=8,
        as_sparse=True,
        seed=0,
    )


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


def run_method(method: str, data: str, epochs: int, accelerator: str) -> dict:
    """Train one method and time it (runs inside its own process, data read from ``data``)."""
    import anndata as ad
    import scvi
    import torch

    from fcr_tools import FCRModel

    scvi.settings.seed = 0
    adata = ad.read_h5ad(data)
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
    n_train = None
    if method == "scVI":
        scvi.model.SCVI.setup_anndata(adata, layer="counts", categorical_covariate_keys=None)
        model = scvi.model.SCVI(adata, n_latent=48, n_hidden=128, n_layers=2)
        model.train(batch_size=256, train_size=1.0, **kwargs)
        latent = lambda: model.get_latent_representation(batch_size=1024)  # noqa: E731
        counterfactual = None
    else:
        likelihood = "nb" if "NB" in method else "gaussian"
        FCRModel.setup_anndata(adata, layer="counts" if likelihood == "nb" else None, **SETUP)
        model = FCRModel(adata, likelihood=likelihood)
        plan = {"adversarial_weight": 0.0} if "without discriminators" in method else {}
        model.train(batch_size=256, train_size=1.0, plan_kwargs=plan, **kwargs)
        latent = lambda: model.get_latent_representation(batch_size=1024)  # noqa: E731

        def counterfactual():
            return model.predict_counterfactual(treatment="drug_1", dose=1.0, batch_size=1024)

    n_train = adata.n_obs
    epoch_seconds = float(np.median(timer.times[1:] if len(timer.times) > 1 else timer.times))
    train_peak = _rss_mb()
    _reset_peak_rss()
    model.module.eval()
    latent_rate = adata.n_obs / _best_seconds(latent)
    cf_rate = float("nan")
    if counterfactual is not None:
        cf_rate = adata.n_obs / _best_seconds(counterfactual)
    return {
        "method": method,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "seconds_per_epoch": epoch_seconds,
        "train_cells_per_second": n_train / epoch_seconds,
        "latent_cells_per_second": latent_rate,
        "counterfactual_cells_per_second": cf_rate,
        "rss_after_loading_data_mb": rss_data,
        "training_peak_minus_data_mb": train_peak - rss_data,
        "inference_peak_minus_data_mb": _rss_mb() - rss_data,
        "torch_threads": torch.get_num_threads(),
    }


def profile_fcr(quick: bool, out: Path, n_steps: int = 20) -> None:
    """torch.profiler table of FCR training steps (by total CPU time)."""
    import scvi
    from torch.profiler import ProfilerActivity, profile

    from fcr_tools import FCRModel

    scvi.settings.seed = 0
    adata = make_data(quick)
    FCRModel.setup_anndata(adata, **SETUP)
    model = FCRModel(adata)
    model.train(max_epochs=1, enable_progress_bar=False, train_size=1.0, limit_train_batches=3)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        model.train(
            max_epochs=1, enable_progress_bar=False, train_size=1.0, limit_train_batches=n_steps
        )
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
    out.write_text(f"FCR training, {n_steps} steps, batch 256, {adata.shape}\n\n{table}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--name", default="speed", help="result file name (default speed)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    if args.worker:
        print(json.dumps(run_method(args.worker, args.data, args.epochs, args.accelerator)))
        return
    if args.profile:
        profile_fcr(args.quick, RESULTS / f"speed_profile{suffix}.txt")
        return

    methods = ["FCR", "FCR without discriminators", "FCR (NB likelihood)", "scVI"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "screen.h5ad")
        make_data(args.quick).write_h5ad(data)  # once, so every worker starts from the file
        for method in methods:
            cmd = [sys.executable, str(HERE), "--worker", method, "--data", data]
            cmd += ["--epochs", str(args.epochs), "--accelerator", args.accelerator]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    cmd = [sys.executable, str(HERE), "--profile"] + (["--quick"] if args.quick else [])
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    table = pd.DataFrame(rows)
    scvi_epoch = table.loc[table.method == "scVI", "seconds_per_epoch"].iloc[0]
    table.insert(4, "epoch_time_vs_scVI", table["seconds_per_epoch"] / scvi_epoch)
    flags = (" --quick" if args.quick else "") + (f" --name {args.name}" * (args.name != "speed"))
    write_results(
        args.name + suffix,
        "python benchmarks/speed.py" + flags,
        {
            "title": "Speed and memory",
            "description": (
                f"{rows[0]['n_cells']} cells x {rows[0]['n_genes']} genes (sparse CSR), batch "
                f"size 256, {args.epochs} epochs per method (median epoch time after the "
                "first), no validation; each method in its own process, reading the same "
                "h5ad. Memory: rss_after_loading_data_mb is the process right after reading "
                "the data (imports included); training_ / inference_peak_minus_data_mb what "
                "the peak RSS during training / during the inference calls adds to it (Linux "
                "VmHWM, reset after loading and after training; inference includes the dense "
                f"{rows[0]['n_cells']} x {rows[0]['n_genes']} float32 output of "
                "predict_counterfactual). FCR: default "
                "settings (16/16/16 latents, width 128, 2 layers; Gaussian on log-normalised "
                "X unless NB); scVI: n_latent=48, n_hidden=128, n_layers=2, NB on counts. "
                "Inference throughput with batch size 1024 (median of 3 calls after a warm-up). "
                "Profile: "
                f"results/speed_profile{suffix}.txt."
            ),
        },
        {"results": table},
    )


if __name__ == "__main__":
    main()
