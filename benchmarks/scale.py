"""Scale benchmark: one training epoch of FCR on simulated sparse screens of growing size.

Writes ``scale.json`` and ``scale.md`` (with the command) to ``--out``. The command that made
the committed results::

    python benchmarks/scale.py --sizes 10000 100000 500000 --n-genes 2000 --threads 1 \
        --out benchmarks/results

(One torch thread: on the shared two-core machine of the committed run, two threads that
compete with other processes made each step more than ten times slower.)

Steps:

1. **Data.** One screen of ``max(sizes)`` cells x ``n_genes`` genes is simulated with the
   generative model of :func:`fcr_tools.data.simulate_screen` (4 cell lines, 6 drugs at 3
   doses, controls; its parameters come from ``simulate_screen`` itself) but in chunks of
   cells, so that only the sparse result is held whole (``simulate_screen`` builds dense
   matrices: 5e5 x 2000 would need tens of GB). ``X`` is log-normalised CSR float32. Cells
   are in random order; the first ``n`` cells of each size are written to
   ``screen_<n>.h5ad`` in the data folder (reused by later runs with ``--data``).
2. **Measure**, in a fresh process per size: read the screen (the AnnData's resident memory
   is recorded), reset the process' peak resident memory (``/proc/self/clear_refs``),
   then ``setup_anndata``, build ``FCRModel`` (default sizes), build the control-partner pool
   and draw a partner for every cell (timed), and ``train(max_epochs=1)`` (default batch size
   256, train 90% / validation 10%). The peak resident memory after that, minus the memory
   after loading, is the model's overhead over the data. The epoch is timed in wall-clock and
   in CPU seconds (CPU time is less sensitive to other processes on a shared machine).

Run ``python benchmarks/scale.py --help`` for the options (e.g. ``--accelerator gpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import sparse

MiB = 2**20
N_CELL_LINES, N_DRUGS, DOSES = 4, 6, (0.1, 0.3, 1.0)
LIBRARY_SIZE = (6.0, 0.3)  # about 400 counts per cell over 2,000 genes: ~15% non-zero
CHUNK = 5_000


# ------------------------------------------------------------------------------ memory
def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rss() -> int:
    try:
        return _status("VmRSS")
    except (OSError, KeyError):  # not Linux
        import psutil

        return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    """Reset the peak resident memory (VmHWM) to the current one; False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmHWM") <= _rss() * 1.05
    except (OSError, KeyError):
        return False


def _peak(reset_worked: bool) -> int:
    if reset_worked:
        return _status("VmHWM")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ------------------------------------------------------------------------------ data
def generate(folder: Path, sizes: list[int], n_genes: int, seed: int) -> dict:
    """Simulate ``max(sizes)`` cells chunk by chunk; write the first ``n`` cells for each size.

    Files: ``folder / f"screen_{n}.h5ad"`` (sparse CSR X), and ``generation.json``.
    """
    import anndata as ad

    n_cells = max(sizes)
    start = time.perf_counter()
    model, d, conditions, rng = _design(n_cells, n_genes, seed)
    X = sparse.vstack(list(_chunks(model, d, conditions, rng)), format="csr")
    obs, var = _obs_var(model, d, conditions)
    seconds, peak = time.perf_counter() - start, _peak(False)
    for n in sizes:
        ad.AnnData(X=X[:n], obs=obs.iloc[:n], var=var).write_h5ad(folder / f"screen_{n}.h5ad")
    record = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "density": float(X.nnz / (n_cells * n_genes)),
        "seconds": seconds,
        "peak_rss_mib": peak / MiB,
        "seed": seed,
    }
    (folder / "generation.json").write_text(json.dumps(record))
    return record


def _design(n_cells: int, n_genes: int, seed: int):
    """The benchmark's generative model, its conditions, the condition of each of ``n_cells``
    cells and the random generator that simulates them (in this order, for both writers)."""
    from fcr_tools.data import simulate_screen
    from fcr_tools.data._simulate import CONTROL, _Model

    # the generative parameters of a screen of this design (a few cells only)
    template = simulate_screen(
        n_cell_lines=N_CELL_LINES,
        n_treatments=N_DRUGS,
        doses=DOSES,
        n_cells_per_condition=1,
        n_genes=n_genes,
        library_size=LIBRARY_SIZE,
        seed=seed,
    )
    model = _Model(template.uns["fcr_simulation"])
    lines, drugs, doses, vectors, weights = [], [], [], [], []
    for c in range(N_CELL_LINES):
        for drug, dose in [(CONTROL, 0.0)] + [(d, x) for d in model.drugs for x in DOSES]:
            lines.append(c)
            drugs.append(drug)
            doses.append(dose)
            vectors.append(model.dose_vector(drug, dose if drug != CONTROL else None))
            weights.append(len(DOSES) if drug == CONTROL else 1)  # as simulate_screen
    weights = np.array(weights, float) / np.sum(weights)
    design = {"lines": np.array(lines), "drugs": drugs, "doses": doses}
    design.update(vectors=np.stack(vectors), weights=weights, var_names=template.var_names)
    rng = np.random.default_rng(seed + 1)
    conditions = rng.choice(len(lines), size=n_cells, p=weights)
    return model, design, conditions, rng


def _chunks(model, d: dict, conditions: np.ndarray, rng):
    """The cells' log-normalised expression, ``CHUNK`` cells at a time (CSR float32)."""
    from fcr_tools.data._simulate import _lognormalize, _sample_counts

    for first in range(0, len(conditions), CHUNK):
        cond = conditions[first : first + CHUNK]
        c, h = d["lines"][cond], model.hill(d["vectors"][cond])
        latents = []
        for mu, sd in (model.law_x(c), model.law_t(h), model.law_tx(c, h)):
            latents.append((mu + sd * rng.standard_normal(mu.shape)).astype(np.float32))
        rho = model.rho(np.concatenate(latents, axis=1).astype(np.float64))
        library = np.exp(rng.normal(*LIBRARY_SIZE, len(cond)))
        counts = _sample_counts(rng, library[:, None] * rho, model.theta)
        del rho
        block = sparse.csr_matrix(_lognormalize(counts).astype(np.float32))
        del counts
        yield block


def _obs_var(model, d: dict, conditions: np.ndarray):
    """obs (cell line, drug, dose of every cell) and var of the simulated screen."""
    import pandas as pd

    obs = pd.DataFrame(
        {
            "cell_line": pd.Categorical(np.array(model.cell_lines)[d["lines"][conditions]]),
            "drug": pd.Categorical(np.array(d["drugs"], dtype=object)[conditions]),
            "dose": np.array(d["doses"])[conditions],
        },
        index=pd.Index([f"cell_{i}" for i in range(len(conditions))]),
    )
    return obs, pd.DataFrame(index=d["var_names"].copy())


def generate_stores(folder: Path, sizes: list[int], n_genes: int, seed: int) -> dict:
    """Simulate ``max(sizes)`` cells chunk by chunk straight into on-disk stores.

    The same design and generative model as :func:`generate`, but each chunk of cells is
    appended to ``store_<n>.h5ad`` for every size ``n`` it falls in (the first ``n`` cells),
    through :class:`fcr_tools.data.StoreWriter`: memory holds one chunk and the obs, never the
    matrix. Also writes ``store_generation.json``.
    """
    from fcr_tools.data import StoreWriter

    n_cells = max(sizes)
    start = time.perf_counter()
    model, d, conditions, rng = _design(n_cells, n_genes, seed)
    obs, var = _obs_var(model, d, conditions)
    writers = {n: StoreWriter(folder / f"store_{n}.h5ad", obs.iloc[:n], var) for n in sizes}
    nnz = 0
    for first, block in zip(
        range(0, n_cells, CHUNK), _chunks(model, d, conditions, rng), strict=True
    ):
        nnz += block.nnz
        for n, writer in writers.items():
            if first < n:
                writer.append(block[: n - first])
    for writer in writers.values():
        writer.close()
    record = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "density": float(nnz / (n_cells * n_genes)),
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": _peak(False) / MiB,
        "store_gib": {str(n): (folder / f"store_{n}.h5ad").stat().st_size / 2**30 for n in sizes},
        "seed": seed,
    }
    (folder / "store_generation.json").write_text(json.dumps(record))
    return record


# ------------------------------------------------------------------------------ one size
def measure(
    data: Path, n_cells: int, accelerator: str, batch_size: int, threads: int | None
) -> dict:
    """Load ``n_cells`` cells, set up, build and train FCR for one epoch; time and memory."""
    import anndata as ad
    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

    from fcr_tools import FCRModel
    from fcr_tools._pairing import FCRDataLoader

    if threads:
        torch.set_num_threads(threads)
    scvi.settings.seed = 0
    scvi.settings.logging_dir = Path(tempfile.mkdtemp())
    rss_start = _rss()
    adata = ad.read_h5ad(data / f"screen_{n_cells}.h5ad")
    X = adata.X
    rss_loaded = _rss()
    reset_worked = _reset_peak()

    class EpochTimer(Callback):
        def on_train_epoch_start(self, trainer, module):
            self.start = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer, module):  # after validation
            self.seconds = time.perf_counter() - self.start[0]
            self.cpu_seconds = time.process_time() - self.start[1]

    timer = EpochTimer()
    t0 = time.perf_counter(), time.process_time()
    FCRModel.setup_anndata(
        adata, treatment_key="drug", dose_key="dose", covariate_keys="cell_line"
    )
    t1 = time.perf_counter(), time.process_time()
    model = FCRModel(adata)
    t2 = time.perf_counter(), time.process_time()
    loader = FCRDataLoader(model.adata_manager, pair_controls=True, batch_size=batch_size)
    t3 = time.perf_counter(), time.process_time()
    loader.dataset.pool.sample(np.arange(adata.n_obs))
    t4 = time.perf_counter(), time.process_time()
    del loader
    model.train(
        max_epochs=1,
        batch_size=batch_size,
        accelerator=accelerator,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        shrinkage=False,
    )
    t5 = time.perf_counter(), time.process_time()
    peak = _peak(reset_worked)
    device = str(next(model.module.parameters()).device)
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name()})"
    return {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "nnz": int(X.nnz),
        "x_mib": (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / MiB,
        "anndata_rss_mib": (rss_loaded - rss_start) / MiB,
        "rss_after_load_mib": rss_loaded / MiB,
        "peak_rss_mib": peak / MiB,
        "overhead_mib": (peak - rss_loaded) / MiB,
        "peak_is_since_load": reset_worked,
        "setup_s": t1[0] - t0[0],
        "setup_cpu_s": t1[1] - t0[1],
        "model_init_s": t2[0] - t1[0],
        "pairing_pool_s": t3[0] - t2[0],
        "pairing_pool_cpu_s": t3[1] - t2[1],
        "pairing_draw_all_s": t4[0] - t3[0],
        "pairing_draw_all_cpu_s": t4[1] - t3[1],
        "epoch_s": getattr(timer, "seconds", float("nan")),
        "epoch_cpu_s": getattr(timer, "cpu_seconds", float("nan")),
        "train_call_s": t5[0] - t4[0],
        "n_train_steps": int(np.ceil(len(model.train_indices) / batch_size)),
        "batch_size": batch_size,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "train_loss": float(model.history["train_loss"].to_numpy(dtype=float).ravel()[-1]),
    }


# ------------------------------------------------------------------------------ out of core
def measure_ooc(
    data: Path, n_cells: int, source: str, batch_size: int, steps: int, threads: int | None
) -> dict:
    """Train ``steps`` steps from ``store_<n>.h5ad`` read as a store (``source="store"``) or
    whole into memory (``"memory"``), then write the latents of every cell; time and memory.

    Peak resident memory is that of the whole process since its start (Python, torch and
    scvi-tools included). Throughput is measured over the training steps after the first 20
    (warm-up), in cells per second of wall-clock and of CPU time.
    """
    import anndata as ad
    import h5py
    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

    from fcr_tools import FCRModel
    from fcr_tools.data import read_store

    if threads:
        torch.set_num_threads(threads)
    scvi.settings.seed = 0
    scvi.settings.logging_dir = Path(tempfile.mkdtemp())
    path = data / f"store_{n_cells}.h5ad"
    rss_start = _rss()
    t0 = time.perf_counter()
    adata = read_store(path) if source == "store" else ad.read_h5ad(path)
    open_s = time.perf_counter() - t0
    rss_loaded = _rss()

    class StepTimer(Callback):
        warmup = min(20, steps // 4)

        def __init__(self):
            self.stamps = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.stamps.append((time.perf_counter(), time.process_time()))

        def on_train_end(self, trainer, module):
            self.stamps.append((time.perf_counter(), time.process_time()))

    timer = StepTimer()
    t0 = time.perf_counter(), time.process_time()
    FCRModel.setup_anndata(
        adata, treatment_key="drug", dose_key="dose", covariate_keys="cell_line"
    )
    t1 = time.perf_counter(), time.process_time()
    model = FCRModel(adata)
    model.train(
        max_epochs=10**6,  # stopped by max_steps
        max_steps=steps,
        batch_size=batch_size,
        accelerator="cpu",
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        shrinkage=False,
    )
    t2 = time.perf_counter(), time.process_time()
    stamps = timer.stamps[timer.warmup :]
    timed_steps = len(stamps) - 1
    wall = stamps[-1][0] - stamps[0][0]
    cpu = stamps[-1][1] - stamps[0][1]
    rss_trained = _rss()
    t3 = time.perf_counter(), time.process_time()
    model.write_latents(batch_size=4096)
    t4 = time.perf_counter(), time.process_time()
    peak = _peak(False)
    keys = [f"X_fcr_{b}" for b in ("x", "t", "tx")]
    if source == "store":  # drop the latents again: the store is reused by later runs
        adata.file.close()
        with h5py.File(path, "r+") as f:
            written = (f["obsm"][keys[0]].shape[0], sum(f["obsm"][k].shape[1] for k in keys))
            for key in keys:
                del f["obsm"][key]
    else:
        written = (adata.n_obs, sum(adata.obsm[key].shape[1] for key in keys))
    return {
        "source": source,
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "store_gib": path.stat().st_size / 2**30,
        "open_s": open_s,
        "rss_start_mib": rss_start / MiB,
        "rss_loaded_mib": rss_loaded / MiB,
        "rss_trained_mib": rss_trained / MiB,
        "peak_rss_mib": peak / MiB,
        "setup_s": t1[0] - t0[0],
        "setup_cpu_s": t1[1] - t0[1],
        "train_call_s": t2[0] - t1[0],
        "steps": steps,
        "timed_steps": timed_steps,
        "batch_size": batch_size,
        "cells_per_s": timed_steps * batch_size / wall,
        "cells_per_cpu_s": timed_steps * batch_size / cpu,
        "step_ms": 1000 * wall / timed_steps,
        "step_cpu_ms": 1000 * cpu / timed_steps,
        "write_latents_s": t4[0] - t3[0],
        "write_latents_cpu_s": t4[1] - t3[1],
        "latents_shape": list(written),
        "torch_threads": torch.get_num_threads(),
        "obs_names_dtype": str(adata.obs_names.dtype),
        "train_loss_last": float(model.history["train_loss_step"].to_numpy(float).ravel()[-1])
        if "train_loss_step" in model.history
        else None,
    }


def _names_kind(run: dict) -> str:
    """How a run held the cells' names (older results did not record it)."""
    dtype = run.get("obs_names_dtype")
    if dtype is None or dtype == "object":
        return "Python strings"
    return f"Arrow strings (pandas dtype `{dtype}`)"


def _markdown_ooc(result: dict) -> str:
    m = result["machine"]
    g = result["data"]
    runs = result["runs"]
    largest = max(runs, key=lambda r: r["n_cells"])
    epoch_steps = int(np.ceil(0.9 * largest["n_cells"] / largest["batch_size"]))
    epoch_minutes = epoch_steps * largest["step_ms"] / 60_000
    lines = [
        "# Out-of-core scale benchmark: training from an on-disk store",
        "",
        "Produced by (from the repository root):",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores, {m['memory_gib']:.0f} GiB, no GPU; "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} "
        f"(a shared machine: times are indicative); Python {m['python']}, torch {m['torch']}, "
        f"pyarrow {m.get('pyarrow') or 'not installed'}, fcr_tools {m['fcr_tools']}; "
        f"{result['date']}.",
        "",
        f"Data: {g['n_cells']:,} simulated cells x {g['n_genes']} genes (4 cell lines x 6 drugs x "
        f"3 doses + controls), sparse CSR float32, {100 * g['density']:.0f}% non-zero, written "
        "chunk by chunk with `fcr_tools.data.StoreWriter` into stores of the first "
        f"{', '.join(f'{int(n):,}' for n in g['store_gib'])} cells "
        f"({', '.join(f'{v:.2f}' for v in g['store_gib'].values())} GiB) in "
        f"{g['seconds']:.0f} s (peak RSS {g['peak_rss_mib']:.0f} MiB). "
        f"Model: `FCRModel` defaults (latents 16+16+16, 128 hidden units, gaussian). Training: "
        f"`max_steps={runs[0]['steps']}` (Lightning counts optimizer steps; FCR makes two per "
        f"minibatch, so {runs[0]['steps'] // 2} minibatches of {runs[0]['batch_size']} cells, "
        "each cell with its control partner), not full epochs: an epoch of the largest store "
        f"is {epoch_steps:,} minibatches, about {epoch_minutes:.0f} minutes at the measured "
        f"time per minibatch. Throughput over the {runs[0]['timed_steps']} minibatches after the "
        "first 20. Then `write_latents` for every cell "
        "(batches of 4,096; into the store's `obsm` for a store, into memory otherwise). One "
        "torch thread.",
        "",
        "| cells | X read from | store (GiB) | RSS after open (MiB) | peak RSS (MiB) "
        "| setup (s) | ms / minibatch | cells / s | cells / CPU s | write latents (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['n_cells']:,} | {'disk (store)' if r['source'] == 'store' else 'memory'} | "
            f"{r['store_gib']:.2f} | {r['rss_loaded_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['setup_s']:.1f} | {r['step_ms']:.0f} | {r['cells_per_s']:.0f} | "
            f"{r['cells_per_cpu_s']:.0f} | {r['write_latents_s']:.1f} |"
        )
    stores = [r for r in runs if r["source"] == "store"]
    memory = [r for r in runs if r["source"] == "memory"]
    if stores:
        peaks = [r["peak_rss_mib"] for r in stores]
        mid = (max(peaks) + min(peaks)) / 2
        small, large = stores[0], stores[-1]
        cells = large["n_cells"] - small["n_cells"]

        def per_cell(key, base=None):
            grow = large[key] - small[key]
            if base is not None:
                grow -= large[base] - small[base]
            return grow * MiB / cells

        lines += [
            "",
            f"Peak RSS from the store: {min(peaks):.0f}-{max(peaks):.0f} MiB over "
            f"{small['n_cells']:,}-{large['n_cells']:,} cells: the largest is "
            f"{max(peaks) / min(peaks):.2f} times the smallest, or {mid:.0f} MiB ± "
            f"{100 * (max(peaks) - mid) / mid:.0f}%. Per additional cell: "
            f"{per_cell('rss_loaded_mib'):.0f} bytes after opening (obs as `read_store` reads "
            f"it: the cell names as {_names_kind(large)}, the dose and the categories' codes), "
            f"{per_cell('rss_trained_mib', 'rss_loaded_mib'):.0f} bytes more held after "
            "training (the registered codes, the train / validation split that scvi-tools keeps "
            "and memory that the allocator keeps after the per-cell arrays of training are "
            f"freed), {per_cell('peak_rss_mib'):.0f} bytes of peak in all.",
        ]
    same = [(s, r) for s in stores for r in memory if s["n_cells"] == r["n_cells"]]
    for s, r in same:
        lines.append(
            f"At {s['n_cells']:,} cells the store trains at "
            f"{100 * s['cells_per_s'] / r['cells_per_s']:.0f}% of the in-memory throughput "
            f"(wall-clock; {100 * s['cells_per_cpu_s'] / r['cells_per_cpu_s']:.0f}% in CPU time)."
        )
    lines += [
        "",
        "*RSS after open*: the process' resident memory after opening the store (obs and var "
        "read, X left on disk) or reading the file whole (memory). *peak RSS*: the peak "
        "resident memory of the whole process since its start, through setup, training and "
        "writing the latents (Python, torch and scvi-tools included; the operating system's "
        "page cache is not counted: the stores sat on a local disk with room to cache them). "
        "*setup*: `setup_anndata`, which scans every value of X once (chunk by chunk). "
        "*write latents*: the three blocks of every cell, 48 floats per cell. Every number is "
        "in `scale_ooc.json`.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ driver
def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _machine() -> dict:
    import torch

    import fcr_tools

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyarrow": _version("pyarrow"),
        "fcr_tools": fcr_tools.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Scale benchmark: one training epoch on sparse simulated screens",
        "",
        "Produced by (from the repository root):",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPU cores, {m['memory_gib']:.0f} GiB; "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} "
        f"(a shared machine: times are indicative); Python {m['python']}, torch {m['torch']}, "
        f"fcr_tools {m['fcr_tools']}; {result['date']}.",
        "",
        f"Data: {result['data']['n_genes']} genes, sparse CSR float32 log-normalised `X` "
        f"({100 * result['data']['density']:.0f}% non-zero), 4 cell lines x 6 drugs x 3 doses + "
        "controls; generated chunk by chunk in "
        f"{result['data']['seconds']:.0f} s (peak {result['data']['peak_rss_mib']:.0f} MiB). "
        "Model: `FCRModel` defaults (latents 16+16+16, 128 hidden units, gaussian), "
        f"batch size {result['runs'][0]['batch_size']}, one epoch = train (90% of cells) + "
        "validation (10%).",
        "",
        "| cells | X (MiB) | AnnData RSS (MiB) | peak RSS (MiB) | overhead over data (MiB) "
        "| setup CPU (s) | pairing pool + draw CPU (s) | epoch wall (s) | epoch CPU (s) "
        "| steps | device |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['n_cells']:,} | {r['x_mib']:.0f} | {r['anndata_rss_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {r['overhead_mib']:.0f} | {r['setup_cpu_s']:.2f} | "
            f"{r['pairing_pool_cpu_s'] + r['pairing_draw_all_cpu_s']:.2f} | {r['epoch_s']:.1f} | "
            f"{r['epoch_cpu_s']:.1f} | "
            f"{r['n_train_steps']} | {r['device']}, {r['torch_threads']} torch "
            f"thread{'s' if r['torch_threads'] != 1 else ''} |"
        )
    lines += [
        "",
        "*X*: bytes of the CSR arrays; *AnnData RSS*: resident memory added by loading the "
        "AnnData; *peak RSS*: the process' peak resident memory during setup, model building, "
        "pairing and the epoch (Python, torch and scvi-tools included); *overhead*: peak RSS "
        "minus the resident memory after loading the data. *pairing*: building the pool of "
        "control partners per covariate group and drawing one for every cell. *epoch*: one "
        "pass over the training cells plus validation, in wall-clock and in CPU seconds of "
        "the process. *setup*, *pairing*: CPU seconds (`setup_anndata` checks and registers "
        "the data; the pool is built once per training run). Wall-clock times of every step "
        "are in `scale.json`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--data", type=Path, help="folder of simulated screens to reuse (default: a temp folder)"
    )
    parser.add_argument(
        "--ooc",
        action="store_true",
        help="out of core: train from on-disk stores (store_<n>.h5ad) instead of memory",
    )
    parser.add_argument(
        "--steps", type=int, default=300, help="--ooc: training steps per run (not epochs)"
    )
    parser.add_argument(
        "--memory-sizes",
        type=int,
        nargs="*",
        default=[100_000],
        help="--ooc: sizes also trained with X read whole into memory, for the throughput ratio",
    )
    parser.add_argument("--_measure", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_source", default="store", help=argparse.SUPPRESS)
    parser.add_argument("--_json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._measure is not None and args.ooc:  # child process: one size, out of core
        info = measure_ooc(
            args.data, args._measure, args._source, args.batch_size, args.steps, args.threads
        )
        args._json.write_text(json.dumps(info))
        return
    if args._measure is not None:  # child process: one size
        info = measure(args.data, args._measure, args.accelerator, args.batch_size, args.threads)
        args._json.write_text(json.dumps(info))
        return

    command = "python benchmarks/scale.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    data = args.data or Path(tempfile.mkdtemp(prefix="fcr_scale_"))
    out_json = data / "child.json"
    base = [sys.executable, __file__, "--n-genes", str(args.n_genes), "--data", str(data)]
    base += ["--seed", str(args.seed), "--_json", str(out_json)]
    result = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(),
    }
    if args.ooc:
        return _main_ooc(args, command, data, base, result)
    missing = [n for n in args.sizes if not (data / f"screen_{n}.h5ad").exists()]
    if missing:
        data.mkdir(parents=True, exist_ok=True)
        print(f"simulating {max(args.sizes):,} cells x {args.n_genes} genes ...", flush=True)
        code = (
            "import sys, json; sys.path.insert(0, sys.argv[1]); from scale import generate; "
            "from pathlib import Path; generate(Path(sys.argv[2]), json.loads(sys.argv[3]), "
            "int(sys.argv[4]), int(sys.argv[5]))"
        )
        here = str(Path(__file__).resolve().parent)
        sizes = json.dumps(sorted(args.sizes))
        subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                here,
                str(data),
                sizes,
                str(args.n_genes),
                str(args.seed),
            ],
            check=True,
        )
    result["data"] = json.loads((data / "generation.json").read_text())
    runs = []
    for n in sorted(args.sizes):
        print(f"measuring {n:,} cells ...", flush=True)
        extra = ["--accelerator", args.accelerator, "--batch-size", str(args.batch_size)]
        extra += ["--threads", str(args.threads)] if args.threads else []
        subprocess.run([*base, *extra, "--_measure", str(n)], check=True)
        runs.append(json.loads(out_json.read_text()))
        print(json.dumps(runs[-1]), flush=True)
    result["runs"] = runs
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "scale.md").write_text(_markdown(result))
    print((args.out / "scale.md").read_text())


def _main_ooc(args, command: str, data: Path, base: list[str], result: dict) -> None:
    """The driver of ``--ooc``: build the stores if missing, then one process per run."""
    if args.data is not None:  # the folder is the reader's own: no local path in the results
        command = command.replace(shlex.quote(str(args.data)), "DATA_DIR")
    result["command"] = command
    missing = [n for n in args.sizes if not (data / f"store_{n}.h5ad").exists()]
    if missing:
        data.mkdir(parents=True, exist_ok=True)
        print(f"writing stores of {max(args.sizes):,} cells x {args.n_genes} genes ...")
        code = (
            "import sys, json; sys.path.insert(0, sys.argv[1]); from scale import "
            "generate_stores; from pathlib import Path; generate_stores(Path(sys.argv[2]), "
            "json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))"
        )
        here = str(Path(__file__).resolve().parent)
        sizes = json.dumps(sorted(args.sizes))
        child = [sys.executable, "-c", code, here, str(data), sizes]
        subprocess.run([*child, str(args.n_genes), str(args.seed)], check=True)
    result["data"] = json.loads((data / "store_generation.json").read_text())
    plan = [(n, "memory") for n in sorted(args.memory_sizes)]
    plan += [(n, "store") for n in sorted(args.sizes)]
    runs = []
    extra = ["--ooc", "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    extra += ["--threads", str(args.threads)] if args.threads else []
    for n, source in plan:
        print(f"measuring {n:,} cells from {source} ...", flush=True)
        subprocess.run([*base, *extra, "--_measure", str(n), "--_source", source], check=True)
        runs.append(json.loads((data / "child.json").read_text()))
        print(json.dumps(runs[-1]), flush=True)
    result["runs"] = runs
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_ooc.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "scale_ooc.md").write_text(_markdown_ooc(result))
    print((args.out / "scale_ooc.md").read_text())


if __name__ == "__main__":
    main()
