"""How strongly the default simulated screen pins down z_tx, and how close FCR's fit comes.

Two measurements on each seed of the identifiability benchmark's default screen:

1. **Rotation cost.** z_tx is identifiable component-wise because its conditional prior is
   diagonal with variances that change across (cell line, treatment). Take the true model and
   rotate z_tx by an orthogonal R, with a decoder that undoes R: the data are fitted exactly as
   well, except that the prior of the rotated block must still be diagonal. The best diagonal
   Gaussian loses the total correlation of N(R mu, R S R^T), per cell. That loss, averaged
   over cells, is all the likelihood has to tell the true axes from rotated ones. We report it
   for Haar-random rotations, with the MCC of the rotated truth against the truth.
2. **Held-out ELBO.** Negative ELBO per cell (negative binomial on the counts) on 20% of the
   cells left out of training, and the MCC of z_tx on all cells, for:

   - the true model: the simulator's decoder, dispersions and conditional priors, frozen,
     with FCR's encoder learned (an upper reference: it knows everything but the posteriors);
   - FCR fitted by the ELBO alone (every other term off) for 150 and 300 epochs;
   - FCR with its default objective for 150 epochs.

Run from the repository root:  python benchmarks/identifiability_signal.py [--quick]
Writes benchmarks/results/identifiability_signal.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch
from scipy.stats import special_ortho_group
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import NO_AUX, mean_sd, write_results

from fcr_tools import FCRModel
from fcr_tools._constants import COVARIATES_KEY
from fcr_tools.data import simulate_screen
from fcr_tools.data._simulate import UNS_KEY, _Model
from fcr_tools.metrics import mean_corr_coef

SETUP = {
    "treatment_key": "drug",
    "dose_key": "dose",
    "covariate_keys": "cell_line",
    "layer": "counts",
}
DIMS = {"n_latent_x": 4, "n_latent_t": 4, "n_latent_tx": 4}
TRUE_MODEL = "true decoder and priors (encoder learned)"
# name -> (plan_kwargs, epochs factor relative to --epochs)
FITS = {
    "FCR, ELBO only": (NO_AUX, 1),
    "FCR, ELBO only, twice the epochs": (NO_AUX, 2),
    "FCR, default objective": ({}, 1),
}


# ---------------------------------------------------------------------- the simulator's laws
def simulator_laws(adata) -> tuple[_Model, np.ndarray, np.ndarray]:
    """The simulator's parameters, and each cell's cell-line index and dose responses h.

    Works on any screen of ``simulate_screen`` (any sizes, doses, combinations, sd ranges)
    and on subsets of one.
    """
    sim = _Model(adata.uns[UNS_KEY])
    cell_line = adata.obs["cell_line"].astype(str).map(sim.cl_index).to_numpy()
    dose_col = adata.obs["dose"]
    if pd.api.types.is_numeric_dtype(dose_col.dtype):
        dose_values = [float(d) for d in dose_col.to_numpy()]
    else:  # with combinations: strings "0", "0.3", "0.3+0.3"
        dose_values = dose_col.astype(str).tolist()
    cache: dict = {}
    doses = []
    for key in zip(adata.obs["drug"].astype(str), dose_values, strict=True):
        if key not in cache:
            cache[key] = sim.dose_vector(key[0], key[1], default_dose=None)
        doses.append(cache[key])
    return sim, cell_line, sim.hill(np.stack(doses))


def rotation_cost(adata, n_rotations: int, seed: int) -> dict[str, float]:
    """Nats per cell that a rotation of the true z_tx costs under diagonal priors.

    Analytic (no training) and usable on any screen of ``simulate_screen``: with the true
    conditional sds ``s`` of z_tx, a rotation R turns each cell's prior covariance
    ``diag(s^2)`` into ``R diag(s^2) R^T``; the best diagonal Gaussian then loses its total
    correlation ``0.5 (sum log diag(R S R^T) - sum log s^2)``, averaged over cells.
    """
    sim, cell_line, h = simulator_laws(adata)
    _, sd = sim.law_tx(cell_line, h)
    var = sd**2
    z_tx = adata.obsm["z_tx_true"]
    rng = np.random.default_rng(seed)
    costs, mccs = [], []
    for _ in range(n_rotations):
        if var.shape[1] == 1:  # nothing to rotate
            rot = np.ones((1, 1))
        else:
            rot = special_ortho_group.rvs(var.shape[1], random_state=rng)
        # marginal variances of R diag(var) R^T, per cell
        marginal = var @ (rot**2).T
        total_correlation = 0.5 * (np.log(marginal).sum(1) - np.log(var).sum(1))
        costs.append(total_correlation.mean())
        mccs.append(mean_corr_coef(z_tx @ rot.T, z_tx))
    costs, mccs = np.asarray(costs), np.asarray(mccs)
    below = costs[mccs < 0.8]
    return {
        "rotation_cost_mean": float(costs.mean()),
        "rotation_cost_max": float(costs.max()),
        "cheapest_cost_mcc_below_0.8": float(below.min()) if below.size else float("nan"),
        "mcc_rotated_truth_mean": float(mccs.mean()),
        "z_tx_sd_min": float(sd.min()),
        "z_tx_sd_max": float(sd.max()),
    }


# ---------------------------------------------------------------------- the true model in FCR
class _TrueDecoder(nn.Module):
    """The simulator's decoder (logits of the gene proportions), frozen."""

    def __init__(self, sim: _Model):
        super().__init__()
        for name in ("w1", "b1", "w2", "b2", "w3", "baseline"):
            self.register_buffer(name, torch.as_tensor(getattr(sim, name), dtype=torch.float32))
        self.slope = sim.negative_slope

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = F.leaky_relu(z @ self.w1.T + self.b1, self.slope)
        a = F.leaky_relu(a @ self.w2.T + self.b2, self.slope)
        return a @ self.w3.T + self.baseline


class _OneHotCellLine(nn.Module):
    """Cell line as a one-hot vector (padded to the embedding width the encoders expect)."""

    def __init__(self, n_output: int):
        super().__init__()
        self.n_output = n_output

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return F.one_hot(codes[:, 0], self.n_output).float()


def install_true_model(model: FCRModel, sim: _Model) -> None:
    """Freeze the simulator's decoder, dispersions and priors into ``model.module``."""
    module = model.module
    manager = model.adata_manager
    cell_lines = list(manager.get_state_registry(COVARIATES_KEY).mappings["cell_line"])
    if cell_lines != sim.cell_lines or list(model.treatment_encoder.components) != sim.drugs:
        raise RuntimeError("The model's category order differs from the simulator's.")
    module.decoder = _TrueDecoder(sim)
    module.px_r.data = torch.as_tensor(np.log(sim.theta), dtype=torch.float32)
    module.px_r.requires_grad_(False)
    n_cell_lines = len(sim.cell_lines)
    module.covariate_embedding = _OneHotCellLine(module.covariate_embedding.n_output)

    def prior(e_x: torch.Tensor, t: torch.Tensor, e_tx=None) -> dict[str, tuple]:
        # the simulator's own laws; nothing to learn, so no gradient needs to pass
        c = e_x[:, :n_cell_lines].argmax(-1).cpu().numpy()
        h = sim.hill(t.detach().cpu().numpy())
        laws = {"x": sim.law_x(c), "t": sim.law_t(h), "tx": sim.law_tx(c, h)}
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=t.device)  # noqa: E731
        return {b: (as_tensor(mean), as_tensor(sd) ** 2) for b, (mean, sd) in laws.items()}

    module.prior = prior


# ---------------------------------------------------------------------- fits
def negative_elbo(model: FCRModel, adata, indices: np.ndarray, n_samples: int = 5) -> dict:
    """Reconstruction NLL, KL and their sum per cell on ``indices`` (mean of n_samples)."""
    torch.manual_seed(0)
    parts = model.get_elbo(adata, indices=indices, n_samples=n_samples, return_parts=True)
    return {
        "nll": parts["reconstruction_loss"],
        "kl": parts["kl_local"],
        "neg_elbo": parts["elbo"],
    }


def fit(adata, sim, method: str, epochs: int, seed: int) -> dict:
    scvi.settings.seed = seed
    FCRModel.setup_anndata(adata, **SETUP)
    model = FCRModel(adata, likelihood="nb", **DIMS)
    if method == TRUE_MODEL:
        install_true_model(model, sim)
        plan, n_epochs = {**NO_AUX, "n_epochs_kl_warmup": None}, epochs
    else:
        plan, factor = FITS[method]
        n_epochs = epochs * factor
    model.train(
        max_epochs=n_epochs,
        train_size=0.8,
        validation_size=0.2,
        enable_progress_bar=False,
        plan_kwargs=dict(plan),
        shrinkage=False,
    )
    scores = negative_elbo(model, adata, np.asarray(model.validation_indices))
    z_tx = model.get_latent_representation(block="tx")
    scores["mcc_tx"] = mean_corr_coef(z_tx, adata.obsm["z_tx_true"])
    return {"method": method, "epochs": n_epochs, **scores}


def run_seed(seed: int, epochs: int, n_rotations: int, screen: dict) -> list[dict]:
    torch.set_num_threads(1)
    adata = simulate_screen(**screen, seed=seed)
    sim, _, _ = simulator_laws(adata)
    rows = [
        {
            "seed": seed,
            "method": "rotation of the true z_tx",
            **rotation_cost(adata, n_rotations, seed),
        }
    ]
    for method in (TRUE_MODEL, *FITS):
        rows.append({"seed": seed, **fit(adata.copy(), sim, method, epochs, seed)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--rotations", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2, help="seeds run in parallel")
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    args = parser.parse_args(argv)
    screen = {"n_cell_lines": 4, "n_treatments": 6, "doses": (0.1, 0.3, 1.0)}
    seeds, epochs, rotations = range(args.seeds), args.epochs, args.rotations
    if args.quick:
        screen.update(n_cell_lines=2, n_treatments=2, n_cells_per_condition=20, n_genes=30)
        seeds, epochs, rotations = range(1), 2, 5
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        parts = pool.map(
            run_seed, seeds, [epochs] * len(seeds), [rotations] * len(seeds), [screen] * len(seeds)
        )
        rows = [row for part in parts for row in part]
    per_seed = pd.DataFrame(rows)
    rotation = per_seed[per_seed["method"] == "rotation of the true z_tx"].dropna(
        axis=1, how="all"
    )
    fits = per_seed[per_seed["method"] != "rotation of the true z_tx"].dropna(axis=1, how="all")
    fits = fits.astype({"epochs": int})
    fit_cols = ["neg_elbo", "nll", "kl", "mcc_tx"]
    rot_cols = [c for c in rotation.columns if c not in ("seed", "method")]
    command = "python benchmarks/identifiability_signal.py" + (" --quick" if args.quick else "")
    description = (
        f"Screen: {screen}, other arguments at simulate_screen's defaults; seeds "
        f"{list(seeds)}. Rotation: "
        f"{rotations} Haar-random rotations of the true z_tx per seed; rotation_cost is the "
        "mean over cells of the total correlation of the rotated prior, in nats per cell: what "
        "the likelihood loses when the true z_tx is replaced by a rotated copy with the best "
        "diagonal prior. cheapest_cost_mcc_below_0.8: the lowest cost among the rotations whose "
        "MCC against the truth is below 0.8. Fits: negative binomial likelihood on the counts, "
        "latent sizes 4 / 4 / 4, trained on 80% of the cells; neg_elbo, nll and kl are per cell "
        f"on the other 20% (5 posterior samples); mcc_tx on all cells. Base epochs: {epochs}."
    )
    write_results(
        "identifiability_signal" + ("_quick" if args.quick else ""),
        command,
        {
            "title": "How much the default screen tells about z_tx's axes",
            "description": description,
        },
        {
            "rotation_summary": mean_sd(rotation, ["method"], rot_cols),
            "fit_summary": mean_sd(fits, ["method", "epochs"], fit_cols),
            "per_seed": per_seed,
        },
    )
    print(mean_sd(fits, ["method", "epochs"], fit_cols).to_string())


if __name__ == "__main__":
    main()
