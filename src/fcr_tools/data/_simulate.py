"""Simulated single-cell perturbation screens that follow the FCR causal graph.

The causal graph is ``x -> z_x``, ``t -> z_t``, ``(x, t) -> z_tx`` and
``(z_x, z_t, z_tx) -> y``, where ``x`` is the cell line (covariate), ``t`` the treatment
(drug and dose) and ``y`` the expression profile. Every generative parameter is stored in
``adata.uns["fcr_simulation"]`` so that exact counterfactuals can be computed with
:func:`simulate_counterfactual`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

__all__ = ["simulate_counterfactual", "simulate_screen"]

UNS_KEY = "fcr_simulation"
CONTROL = "control"
SCALE_FACTOR = 1e4
FORMAT_VERSION = 1

# Generative constants (documented in the docstring of ``simulate_screen``).
_EC50_RANGE = (0.1, 1.0)  # log-uniform per drug
_MU_X_SD = 2.0
_SD_X_RANGE = (0.5, 1.0)
_M_T_SD = 2.0
_SD_T_CONTROL = 0.5
_S_T_RANGE = (-0.8, 0.8)  # sd_t = 0.5 * exp(h @ S_t)
_M_TX_SD = 2.0
_SD_TX_RANGE = (0.3, 1.5)  # default `interaction_sd_range`: per (cell line, drug, component)
_SD_TX_CONTROL = 1.0
_NEGATIVE_SLOPE = 0.2
_HIDDEN_BIAS_SD = 0.5
_BASELINE_SD = 1.0
_LOGIT_SD_TARGET = 0.6  # median per-gene sd of the decoder logits over the reference latents
_N_REFERENCE = 1000
_REFERENCE_SD = 2.0
_THETA_LOG_SD = 0.3
_MAX_RESAMPLE = 100


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _fmt_dose(d: float) -> str:
    """Canonical string of a single dose (``"0"`` for no drug)."""
    d = float(d)
    return "0" if d == 0.0 else str(d)


def _hill(dose: np.ndarray, ec50: np.ndarray) -> np.ndarray:
    """Saturating dose response ``d / (d + ec50)`` (0 where ``d == 0``)."""
    dose = np.asarray(dose, dtype=np.float64)
    return dose / (dose + ec50)


def _leaky_relu(a: np.ndarray, slope: float) -> np.ndarray:
    return np.where(a > 0, a, slope * a)


def _random_orthogonal(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Random matrix with orthonormal columns (``n_rows >= n_cols``), Haar distributed."""
    q, r = np.linalg.qr(rng.standard_normal((n_rows, n_cols)))
    return q * np.sign(np.diag(r))


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def _as_str_list(value: Any) -> list[str]:
    """List of str from a list / array read back from h5ad (possibly empty or scalar)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in np.asarray(value, dtype=object).ravel().tolist()]


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_sd_range(name: str, value: Any) -> tuple[float, float]:
    """``(low, high)`` with ``0 < low <= high``, both finite."""
    message = (
        f"`{name}` must be two finite numbers (low, high) with 0 < low <= high, got {value!r}."
    )
    if isinstance(value, str | bytes):
        raise ValueError(message)
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(message)
    low, high = values
    if low > high:
        raise ValueError(message)
    return low, high


# --------------------------------------------------------------------------------------
# the generative model (shared by simulate_screen and simulate_counterfactual)
# --------------------------------------------------------------------------------------
class _Model:
    """Light view of the generative parameters stored in ``uns["fcr_simulation"]``."""

    def __init__(self, p: Mapping[str, Any]):
        self.cell_lines = _as_str_list(p["cell_lines"])
        self.drugs = _as_str_list(p["drugs"])
        self.ec50 = np.asarray(p["ec50"], dtype=np.float64)
        self.mu_x = np.asarray(p["mu_x"], dtype=np.float64)
        self.sd_x = np.asarray(p["sd_x"], dtype=np.float64)
        self.m_t = np.asarray(p["m_t"], dtype=np.float64)
        self.s_t = np.asarray(p["s_t"], dtype=np.float64)
        self.sd_t_control = float(p["sd_t_control"])
        self.m_tx = np.asarray(p["m_tx"], dtype=np.float64)
        self.sd_tx = np.asarray(p["sd_tx"], dtype=np.float64)
        self.sd_tx_control = float(p["sd_tx_control"])
        self.interaction_strength = float(p["interaction_strength"])
        dec = p["decoder"]
        self.w1 = np.asarray(dec["w1"], dtype=np.float64)
        self.b1 = np.asarray(dec["b1"], dtype=np.float64)
        self.w2 = np.asarray(dec["w2"], dtype=np.float64)
        self.b2 = np.asarray(dec["b2"], dtype=np.float64)
        self.w3 = np.asarray(dec["w3"], dtype=np.float64)
        self.baseline = np.asarray(dec["baseline"], dtype=np.float64)
        self.negative_slope = float(dec["negative_slope"])
        self.theta = np.asarray(p["theta"], dtype=np.float64)
        self.scale_factor = float(p["scale_factor"])
        self.cl_index = {c: i for i, c in enumerate(self.cell_lines)}
        self.drug_index = {d: i for i, d in enumerate(self.drugs)}

    # -- treatment -------------------------------------------------------------------
    def dose_vector(self, treatment: str, dose: Any, default_dose: float | None = 1.0):
        """Dose-scaled one-hot treatment vector t in R^{n_treatments}.

        ``dose`` may be a number (shared by all parts of a combination), a string ``"d"`` or
        ``"d1+d2"``, or None (-> ``default_dose``).
        """
        treatment = str(treatment)
        t = np.zeros(len(self.drugs), dtype=np.float64)
        if treatment == CONTROL:
            if dose is not None:
                try:
                    doses = [float(s) for s in str(dose).split("+")]
                except ValueError:
                    doses = [float("nan")]
                if any(d != 0.0 for d in doses):
                    raise ValueError(
                        f"Treatment {CONTROL!r} takes no dose (None or 0), got dose {dose!r}."
                    )
            return t
        parts = treatment.split("+")
        for part in parts:
            if part not in self.drug_index:
                raise ValueError(
                    f"Unknown treatment {part!r}"
                    + (f" in {treatment!r}" if len(parts) > 1 else "")
                    + f"; known treatments are {[CONTROL, *self.drugs]} and "
                    "combinations 'drug_a+drug_b' of them."
                )
        if len(set(parts)) != len(parts):
            raise ValueError(f"Treatment {treatment!r} repeats a drug.")
        if dose is None:
            dose = default_dose
        if isinstance(dose, str):
            try:
                doses = [float(s) for s in dose.split("+")]
            except ValueError:
                raise ValueError(f"Cannot parse dose {dose!r} as a number.") from None
            if len(doses) == 1:
                doses = doses * len(parts)
            elif len(doses) != len(parts):
                raise ValueError(
                    f"Dose {dose!r} has {len(doses)} parts but treatment {treatment!r} has "
                    f"{len(parts)}."
                )
        else:
            try:
                doses = [float(dose)] * len(parts)
            except (TypeError, ValueError):
                raise ValueError(f"Cannot interpret dose {dose!r} as a number.") from None
        for d in doses:
            if not (math.isfinite(d) and d > 0):
                raise ValueError(
                    f"Dose {dose!r} for treatment {treatment!r} must be finite and > 0 "
                    f"(use {CONTROL!r} for untreated cells)."
                )
        for part, d in zip(parts, doses, strict=True):
            t[self.drug_index[part]] = d
        return t

    def hill(self, t: np.ndarray) -> np.ndarray:
        """Per-drug dose responses h_k(d_k) for dose vectors ``t`` (..., K)."""
        return _hill(t, self.ec50)

    # -- latent laws -----------------------------------------------------------------
    def law_x(self, c: np.ndarray):
        return self.mu_x[c], self.sd_x[c]

    def law_t(self, h: np.ndarray):
        mu = h @ self.m_t
        sd = self.sd_t_control * np.exp(h @ self.s_t)
        return mu, sd

    def law_tx(self, c: np.ndarray, h: np.ndarray):
        mu = self.interaction_strength * np.einsum("nk,nkd->nd", h, self.m_tx[c])
        gamma = min(self.interaction_strength, 1.0)
        log_ratio = np.log(self.sd_tx[c] / self.sd_tx_control)
        sd = self.sd_tx_control * np.exp(gamma * np.einsum("nk,nkd->nd", h, log_ratio))
        return mu, sd

    # -- decoder ---------------------------------------------------------------------
    def logits(self, z: np.ndarray) -> np.ndarray:
        a = _leaky_relu(z @ self.w1.T + self.b1, self.negative_slope)
        a = _leaky_relu(a @ self.w2.T + self.b2, self.negative_slope)
        return a @ self.w3.T + self.baseline

    def rho(self, z: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(z))

    def expected(self, rho: np.ndarray) -> np.ndarray:
        return np.log1p(self.scale_factor * rho)


def _sample_counts(rng: np.random.Generator, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """NB(mean, theta) counts as a Gamma-Poisson mixture; rows with zero total are redrawn."""
    shape = np.broadcast_to(theta, mean.shape)
    counts = rng.poisson(rng.gamma(shape, mean / shape)).astype(np.float64)
    for _ in range(_MAX_RESAMPLE):
        empty = np.flatnonzero(counts.sum(axis=1) == 0)
        if empty.size == 0:
            return counts
        m, s = mean[empty], shape[empty]
        counts[empty] = rng.poisson(rng.gamma(s, m / s))
    raise ValueError(
        "Some cells keep drawing zero total counts; increase the library size "
        "(`library_size` mean)."
    )


def _lognormalize(counts: np.ndarray, scale_factor: float = SCALE_FACTOR) -> np.ndarray:
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * scale_factor)


# --------------------------------------------------------------------------------------
# hold-out pairs
# --------------------------------------------------------------------------------------
def _resolve_holdout(
    rng: np.random.Generator,
    n_holdout_pairs: int | Sequence[tuple[str, str]],
    cell_lines: list[str],
    drugs: list[str],
    combo_names: list[str],
) -> list[tuple[str, str]]:
    n_cl, n_dr = len(cell_lines), len(drugs)
    if isinstance(n_holdout_pairs, int | np.integer) and not isinstance(n_holdout_pairs, bool):
        n = int(n_holdout_pairs)
        if n < 0:
            raise ValueError(f"`n_holdout_pairs` must be >= 0, got {n}.")
        max_n = n_cl * n_dr - max(n_cl, n_dr)
        if n > max_n:
            raise ValueError(
                f"Cannot hold out {n} (cell line, treatment) pairs with {n_cl} cell lines and "
                f"{n_dr} treatments while every cell line and every drug still appears treated "
                f"in 'train': at most {max_n} pairs can be held out."
            )
        if n == 0:
            return []
        # Keep a random minimum edge cover of the (cell line x drug) grid in train, then
        # draw the held-out pairs among the remaining pairs.
        perm_c, perm_d = rng.permutation(n_cl), rng.permutation(n_dr)
        keep = {(perm_c[i % n_cl], perm_d[i % n_dr]) for i in range(max(n_cl, n_dr))}
        candidates = [(c, d) for c in range(n_cl) for d in range(n_dr) if (c, d) not in keep]
        chosen = rng.choice(len(candidates), size=n, replace=False)
        pairs = sorted(candidates[i] for i in chosen)
        return [(cell_lines[c], drugs[d]) for c, d in pairs]

    if isinstance(n_holdout_pairs, str):
        raise ValueError(
            "`n_holdout_pairs` must be an int or a list of (cell_line, treatment) tuples."
        )
    treatments = drugs + combo_names
    pairs: list[tuple[str, str]] = []
    for item in n_holdout_pairs:
        if isinstance(item, str):
            item = tuple(item.split("|"))
        if len(item) != 2:
            raise ValueError(f"Hold-out pair {item!r} is not a (cell_line, treatment) pair.")
        cl, tr = str(item[0]), str(item[1])
        if cl not in cell_lines:
            raise ValueError(f"Unknown cell line {cl!r} in `n_holdout_pairs`.")
        if tr not in treatments:
            raise ValueError(
                f"Unknown treatment {tr!r} in `n_holdout_pairs` (the control cannot be held "
                f"out; simulated treatments are {treatments})."
            )
        if (cl, tr) not in pairs:
            pairs.append((cl, tr))
    held = set(pairs)
    for cl in cell_lines:
        if all((cl, d) in held for d in drugs):
            raise ValueError(
                f"Cell line {cl!r} would have no treated cells in 'train' (all its single-drug "
                "pairs are held out)."
            )
    for d in drugs:
        if all((cl, d) in held for cl in cell_lines):
            raise ValueError(
                f"Drug {d!r} would not appear in 'train' (held out in every cell line)."
            )
    return pairs


# --------------------------------------------------------------------------------------
# the laws of simulate_screen, in the order they draw from its generator
# --------------------------------------------------------------------------------------
# Every function below that takes ``rng`` draws from it; simulate_screen calls them in a
# fixed order, which is what makes a seed reproduce the same screen.
def _combination_parts(
    combinations: Sequence[tuple[str, str] | str], drugs: list[str]
) -> list[tuple[str, str]]:
    """Validated, de-duplicated drug pairs of ``combinations``."""
    parts: list[tuple[str, str]] = []
    for combo in combinations:
        if isinstance(combo, str):
            combo = tuple(combo.split("+"))
        if len(combo) != 2:
            raise ValueError(f"Combination {combo!r} is not a pair of drug names.")
        a, b = str(combo[0]), str(combo[1])
        for name in (a, b):
            if name not in drugs:
                raise ValueError(f"Unknown drug {name!r} in `combinations`; drugs are {drugs}.")
        if a == b:
            raise ValueError(f"Combination {combo!r} combines a drug with itself.")
        if (a, b) not in parts:
            parts.append((a, b))
    return parts


def _draw_dose_response(rng: np.random.Generator, n_treatments: int) -> np.ndarray:
    """EC50 of each drug's saturating response ``d / (d + ec50)``, log-uniform."""
    return np.exp(rng.uniform(np.log(_EC50_RANGE[0]), np.log(_EC50_RANGE[1]), n_treatments))


def _draw_law_x(
    rng: np.random.Generator, n_cell_lines: int, dx: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of ``z_x | x = c`` for each cell line."""
    mu_x = rng.normal(0.0, _MU_X_SD, (n_cell_lines, dx))
    sd_x = rng.uniform(*_SD_X_RANGE, (n_cell_lines, dx))
    return mu_x, sd_x


def _draw_law_t(
    rng: np.random.Generator, n_treatments: int, dt: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-drug mean shifts ``M_t`` and log-sd slopes ``S_t`` of ``z_t | t``."""
    m_t = rng.normal(0.0, _M_T_SD, (n_treatments, dt))
    s_t = rng.uniform(*_S_T_RANGE, (n_treatments, dt))
    return m_t, s_t


def _draw_law_tx(
    rng: np.random.Generator,
    n_cell_lines: int,
    n_treatments: int,
    dtx: int,
    rank: int | None,
    sd_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-(cell line, drug) means ``M_tx`` and full-response sds ``sigma_tx`` of ``z_tx``.

    With ``rank`` None the pairs are drawn independently; with an integer ``rank`` they are
    bilinear in cell-line and drug factors of that dimension.
    """
    if rank is None:
        m_tx = rng.normal(0.0, _M_TX_SD, (n_cell_lines, n_treatments, dtx))
        sd_tx = rng.uniform(*sd_range, (n_cell_lines, n_treatments, dtx))
        return m_tx, sd_tx
    # bilinear in cell-line and drug factors; each entry has about sd 1 before scaling
    m_raw, s_raw = (
        np.einsum(
            "cr,kr,rd->ckd",
            rng.standard_normal((n_cell_lines, rank)),
            rng.standard_normal((n_treatments, rank)),
            rng.standard_normal((rank, dtx)),
        )
        / np.sqrt(rank)
        for _ in range(2)
    )
    lo, hi = sd_range
    return _M_TX_SD * m_raw, lo + (hi - lo) / (1.0 + np.exp(-1.5 * s_raw))


def _draw_decoder(rng: np.random.Generator, n_latent: int, n_genes: int) -> dict[str, Any]:
    """Weights of the injective decoder, before the output layer is calibrated."""
    w1 = _random_orthogonal(rng, n_latent, n_latent)
    b1 = rng.normal(0.0, _HIDDEN_BIAS_SD, n_latent)
    w2 = _random_orthogonal(rng, n_latent, n_latent)
    b2 = rng.normal(0.0, _HIDDEN_BIAS_SD, n_latent)
    w3 = _random_orthogonal(rng, n_genes, n_latent)
    baseline = rng.normal(0.0, _BASELINE_SD, n_genes)
    return {
        "w1": w1,
        "b1": b1,
        "w2": w2,
        "b2": b2,
        "w3": w3,
        "baseline": baseline,
        "negative_slope": _NEGATIVE_SLOPE,
    }


def _draw_dispersion(rng: np.random.Generator, dispersion: float, n_genes: int) -> np.ndarray:
    """Per-gene NB inverse dispersions ``theta``, log-normal around ``dispersion``."""
    return dispersion * np.exp(rng.normal(0.0, _THETA_LOG_SD, n_genes))


def _calibrate_output_layer(rng: np.random.Generator, decoder: dict[str, Any]) -> None:
    """Scale ``decoder["w3"]`` so the median per-gene logit sd over reference latents is fixed."""
    n_latent = decoder["w1"].shape[0]
    z_ref = rng.normal(0.0, _REFERENCE_SD, (_N_REFERENCE, n_latent))
    a_ref = _leaky_relu(z_ref @ decoder["w1"].T + decoder["b1"], _NEGATIVE_SLOPE)
    a_ref = _leaky_relu(a_ref @ decoder["w2"].T + decoder["b2"], _NEGATIVE_SLOPE)
    w3 = decoder["w3"]
    decoder["w3"] = w3 * (_LOGIT_SD_TARGET / np.median((a_ref @ w3.T).std(axis=0)))


def _conditions(
    model: _Model,
    treatments: list[str],
    doses: np.ndarray,
    n_control_cells: int,
    n_cells_per_condition: int,
) -> pd.DataFrame:
    """One row per (cell line, treatment, dose) condition: its codes and number of cells.

    Columns ``cell_line`` (index), ``drug``, ``dose`` (string), ``t`` (dose vector) and
    ``n_cells``; the controls of each cell line come first.
    """
    rows = []
    for ci in range(len(model.cell_lines)):
        rows.append((ci, CONTROL, "0", np.zeros(len(model.drugs)), n_control_cells))
        for tr in treatments:
            n_parts = len(tr.split("+"))
            for d in doses:
                dose = "+".join([_fmt_dose(d)] * n_parts)
                rows.append((ci, tr, dose, model.dose_vector(tr, float(d)), n_cells_per_condition))
    return pd.DataFrame(rows, columns=["cell_line", "drug", "dose", "t", "n_cells"])


def _assign_cells(rng: np.random.Generator, n_cells: np.ndarray) -> np.ndarray:
    """Condition of each cell, in a random order."""
    cond_of_cell = np.repeat(np.arange(n_cells.size), n_cells)
    cond_of_cell = cond_of_cell[rng.permutation(cond_of_cell.size)]
    if cond_of_cell.size == 0:
        raise ValueError("The requested design has no cells.")
    return cond_of_cell


def _draw_latents(
    rng: np.random.Generator, model: _Model, c_idx: np.ndarray, h: np.ndarray, dims: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``z_x``, ``z_t``, ``z_tx`` (float32) of cells of cell lines ``c_idx``, responses ``h``."""
    laws = (model.law_x(c_idx), model.law_t(h), model.law_tx(c_idx, h))
    n_cells = c_idx.size
    z_x, z_t, z_tx = (
        (mu + sd * rng.standard_normal((n_cells, d))).astype(np.float32)
        for (mu, sd), d in zip(laws, dims, strict=True)
    )
    return z_x, z_t, z_tx


def _draw_counts(
    rng: np.random.Generator, rho: np.ndarray, theta: np.ndarray, lib_mean: float, lib_sd: float
) -> tuple[np.ndarray, np.ndarray]:
    """Library sizes ``l ~ LogNormal(lib_mean, lib_sd)`` and NB counts of mean ``l * rho``."""
    lib = np.exp(rng.normal(lib_mean, lib_sd, rho.shape[0]))
    return lib, _sample_counts(rng, lib[:, None] * rho, theta)


def _cell_obs(
    conditions: pd.DataFrame,
    cond_of_cell: np.ndarray,
    cell_lines: list[str],
    treatments: list[str],
    holdout: list[tuple[str, str]],
    lib: np.ndarray,
    string_doses: bool,
) -> pd.DataFrame:
    """``obs`` of the cells: names of their condition, hold-out split and library size."""
    cond_cl = conditions["cell_line"].to_numpy()
    cond_drug = conditions["drug"].to_numpy(dtype=object)
    cond_dose = conditions["dose"].to_numpy(dtype=object)
    cl_names = np.asarray(cell_lines, dtype=object)[cond_cl[cond_of_cell]]
    drug_names = cond_drug[cond_of_cell]
    dose_str = cond_dose[cond_of_cell]
    condition = [f"{c}|{d}|{s}" for c, d, s in zip(cl_names, drug_names, dose_str, strict=True)]
    cond_cats = [
        f"{cell_lines[c]}|{d}|{s}" for c, d, s in zip(cond_cl, cond_drug, cond_dose, strict=True)
    ]
    holdout_keys = {f"{cl}|{tr}" for cl, tr in holdout}
    split = np.where(
        [f"{c}|{d}" in holdout_keys for c, d in zip(cl_names, drug_names, strict=True)],
        "holdout",
        "train",
    )
    if string_doses:
        dose_col = pd.Categorical(dose_str, categories=list(dict.fromkeys(cond_dose)))
    else:
        dose_col = np.asarray([float(s) for s in dose_str], dtype=np.float64)
    return pd.DataFrame(
        {
            "cell_line": pd.Categorical(cl_names, categories=cell_lines),
            "drug": pd.Categorical(drug_names, categories=[CONTROL, *treatments]),
            "dose": dose_col,
            "condition": pd.Categorical(condition, categories=cond_cats),
            "split": pd.Categorical(split, categories=["train", "holdout"]),
            "library_size": lib,
        },
        index=pd.Index([f"cell_{i}" for i in range(cond_of_cell.size)]),
    )


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def simulate_screen(
    n_cell_lines: int = 4,
    n_treatments: int = 6,
    doses: Sequence[float] = (0.1, 0.3, 1.0),
    n_cells_per_condition: int = 50,
    n_control_cells: int | None = None,
    n_genes: int = 100,
    n_latent_x: int = 4,
    n_latent_t: int = 4,
    n_latent_tx: int = 4,
    interaction_strength: float = 1.0,
    interaction_rank: int | None = 2,
    interaction_sd_range: tuple[float, float] = _SD_TX_RANGE,
    n_holdout_pairs: int | Sequence[tuple[str, str]] = 0,
    combinations: Sequence[tuple[str, str]] = (),
    library_size: tuple[float, float] = (8.0, 0.3),
    dispersion: float = 20.0,
    as_sparse: bool = False,
    seed: int = 0,
) -> ad.AnnData:
    r"""Simulate a perturbation screen following the FCR causal graph, with ground truth.

    Cells of ``n_cell_lines`` cell lines (covariate ``x``) receive one of ``n_treatments``
    drugs at each dose of ``doses`` (treatment ``t``), or no drug (``"control"``), and
    optionally drug combinations. Latents follow ``x -> z_x``, ``t -> z_t``,
    ``(x, t) -> z_tx``; the expression ``y`` is decoded from ``z = [z_x, z_t, z_tx]``.

    Generative process (all randomness from one ``np.random.default_rng(seed)``):

    - **Treatment.** ``t`` in :math:`\mathbb{R}^{K}` (``K = n_treatments``) is the
      dose-scaled one-hot of the drug (zeros for controls; a combination
      ``"drug_a+drug_b"`` is the sum of its parts). Drug ``k`` acts through the saturating
      response :math:`h_k(d) = d / (d + \mathrm{ec50}_k)`, ``ec50_k`` log-uniform in
      ``[0.1, 1]``; ``h = (h_k(t_k))_k``.
    - :math:`z_x \mid x = c \sim N(\mu_x[c], \mathrm{diag}(s_x[c]^2))` with
      :math:`\mu_x[c] \sim N(0, 2^2 I)` and :math:`s_x[c] \sim U[0.5, 1]^{d_x}`.
    - :math:`z_t \mid t \sim N(h M_t, \mathrm{diag}(s_t^2))`,
      :math:`s_t = 0.5 \exp(h S_t)` (0.5 for controls), with :math:`M_t[k] \sim N(0, 2^2 I)`
      and :math:`S_t[k] \sim U[-0.8, 0.8]^{d_t}`.
    - :math:`z_{tx} \mid x = c, t \sim N(\lambda \sum_k h_k M_{tx}[c, k],
      \mathrm{diag}(s_{tx}^2))` with :math:`\lambda` = ``interaction_strength``,
      :math:`\log s_{tx} = \min(\lambda, 1) \sum_k h_k \log \sigma_{tx}[c, k]`, where
      :math:`\sigma_{tx}[c, k] \in [a, b]^{d_{tx}}` is the pair's sd at full response, with
      ``(a, b) = interaction_sd_range`` (default ``(0.3, 1.5)``).
      With ``interaction_rank=r``, :math:`M_{tx}[c, k] = 2 ((u_c \odot v_k) W) / \sqrt{r}`
      and :math:`\sigma_{tx}[c, k] = a + (b - a)\,\mathrm{sigmoid}(1.5 (u'_c \odot v'_k)
      W' / \sqrt{r})` with standard normal factors :math:`u_c, v_k \in R^r`,
      :math:`W \in R^{r \times d_{tx}}`; with ``interaction_rank=None``,
      :math:`M_{tx}[c, k] \sim N(0, 2^2 I)` and :math:`\sigma_{tx}[c, k] \sim U[a, b]`
      independently per pair (so ``s_tx`` moves from the control sd 1 towards it as the dose
      grows). Controls have
      :math:`z_{tx} \sim N(0, I)` in every cell line; with ``interaction_strength=0``
      :math:`z_{tx} \sim N(0, I)` for every condition.
    - **Decoder** (injective): :math:`a_1 = \mathrm{lrelu}(W_1 z + b_1)`,
      :math:`a_2 = \mathrm{lrelu}(W_2 a_1 + b_2)`, logits :math:`= W_3 a_2 + \beta`, with
      ``W1``, ``W2`` random ``D x D`` orthogonal matrices (``D = n_latent_x + n_latent_t +
      n_latent_tx``), biases ``N(0, 0.5^2)``, leaky-ReLU slope 0.2, ``W3`` a random
      ``n_genes x D`` matrix with orthonormal columns scaled so that the median per-gene sd
      of the logits over reference latents :math:`N(0, 2^2 I)` is 0.6 (genes typically vary
      by 1-3 log units across conditions), and per-gene baseline :math:`\beta \sim N(0, 1)`.
      :math:`\rho = \mathrm{softmax}(\text{logits})` (gene proportions).
    - **Counts.** Library size :math:`l \sim \mathrm{LogNormal}(m, s)` with
      ``(m, s) = library_size``; counts ~ NB(mean :math:`l \rho_g`, inverse dispersion
      :math:`\theta_g`), :math:`\theta_g = ` ``dispersion`` :math:`\cdot \exp(N(0, 0.3^2))`,
      drawn as a Gamma-Poisson mixture. Cells with zero total counts are redrawn.

    Parameters
    ----------
    n_cell_lines
        Number of cell lines (``"cell_line_0"``, ...).
    n_treatments
        Number of single drugs (``"drug_0"``, ...).
    doses
        Positive, distinct doses applied for every drug (and combination).
    n_cells_per_condition
        Cells per (cell line, treatment, dose).
    n_control_cells
        Control cells per cell line; ``None`` -> ``n_cells_per_condition * len(doses)``.
    n_genes
        Number of genes; must be at least the total latent dimension.
    n_latent_x, n_latent_t, n_latent_tx
        Dimensions of ``z_x``, ``z_t`` and ``z_tx``.
    interaction_strength
        Scale (>= 0) of the (cell line, treatment)-specific ``z_tx`` means; its value
        clipped to ``[0, 1]`` also scales the log-sd contrasts of ``z_tx``. 0 gives a
        purely additive model where ``z_tx ~ N(0, I)`` for all conditions.
    interaction_rank
        Structure of the interaction law across (cell line, drug) pairs. An integer ``r``:
        the z_tx mean and sd of pair (c, k) are functions of the element-wise product of an
        ``r``-dimensional cell-line factor and an ``r``-dimensional drug factor (a cell line's
        pathway state meets a drug's targets), so the interaction of a pair never measured is
        predictable from the other pairs of its cell line and drug. ``None``: independent
        draws per pair, whose interactions no model can predict for held-out pairs.
    interaction_sd_range
        ``(low, high)``, ``0 < low <= high``: range of the per-(cell line, drug, component)
        sd of ``z_tx`` at full dose response (controls have sd 1). It sets how much the
        conditional prior of ``z_tx`` changes across conditions, and so how well its axes
        are identifiable: the default ``(0.3, 1.5)`` gives weak variance contrasts (a
        random rotation of the true ``z_tx`` costs a few hundredths of a nat per cell under
        diagonal priors); wider ranges such as ``(0.1, 3.0)`` give stronger ones. Only
        ``sd_tx`` changes; the default reproduces earlier versions exactly.
    n_holdout_pairs
        Number of random (cell line, drug) pairs whose cells (all doses) get
        ``obs["split"] == "holdout"``, or an explicit list of ``(cell_line, treatment)`` names
        (a treatment may be a simulated combination ``"drug_a+drug_b"``). Every cell line and
        every drug must still appear treated in ``"train"``.
    combinations
        Drug pairs ``(drug_a, drug_b)``; cells with treatment ``"drug_a+drug_b"`` are added for
        every cell line and every dose ``d`` (both drugs at ``d``).
    library_size
        Mean and sd of the log library size (``exp(8) ~ 3000`` counts).
    dispersion
        Typical NB inverse dispersion ``theta`` (per-gene values scatter around it).
    as_sparse
        Return ``X`` and ``layers["counts"]`` as :class:`scipy.sparse.csr_matrix`.
    seed
        Seed of the random generator; the same seed gives an identical AnnData.

    Returns
    -------
    AnnData with (cells shuffled, ``obs_names`` ``"cell_0"``..., ``var_names``
    ``"gene_0"``...):

    - ``X``: ``log1p(counts / total * 1e4)`` (float32).
    - ``layers["counts"]``: raw counts (float32); ``layers["expected"]``: noise-free
      ``log1p(1e4 * rho)`` (float32, dense).
    - ``obs``: ``"cell_line"``, ``"drug"`` (categorical, includes ``"control"`` and
      combinations ``"drug_a+drug_b"``), ``"dose"``, ``"condition"``
      (``"cell_line|drug|dose"``), ``"split"`` (``"train"``/``"holdout"``), and
      ``"library_size"`` (the drawn ``l``). ``"dose"`` is float64 (0.0 for controls) when
      there are no combinations; with combinations it is a categorical of strings:
      ``"0"`` for controls, ``"0.3"`` for single drugs, ``"0.3+0.3"`` for combinations.
      The dose in ``"condition"`` uses the same strings (``str(float(d))``, ``"0"``).
    - ``obsm``: ``"z_x_true"``, ``"z_t_true"``, ``"z_tx_true"`` (float32).
    - ``uns["fcr_simulation"]``: names (``cell_lines``, ``drugs``, ``combinations``,
      ``holdout_pairs`` as ``"cell_line|treatment"`` strings), all generative parameters
      (``ec50``, ``mu_x``, ``sd_x``, ``m_t``, ``s_t``, ``sd_t_control``, ``m_tx``, ``sd_tx``,
      ``sd_tx_control``, ``interaction_strength``, ``decoder`` with ``w1, b1, w2, b2, w3,
      baseline, negative_slope``, ``theta``, ``scale_factor``) and the call arguments
      (``params``). The standardised noise of a cell is ``(z - mu) / sd`` under its own
      condition. Everything survives ``write_h5ad``/``read_h5ad``.

    Examples
    --------
    >>> from fcr_tools.data import simulate_screen
    >>> adata = simulate_screen(n_cell_lines=2, n_treatments=3, n_cells_per_condition=10)
    >>> adata.shape
    (240, 100)
    >>> sorted(adata.obs["drug"].cat.categories)
    ['control', 'drug_0', 'drug_1', 'drug_2']
    """
    # ---- validation ------------------------------------------------------------------
    n_cell_lines = _check_positive_int("n_cell_lines", n_cell_lines)
    n_treatments = _check_positive_int("n_treatments", n_treatments)
    n_cells_per_condition = _check_positive_int("n_cells_per_condition", n_cells_per_condition)
    if n_control_cells is None:
        n_control_cells = n_cells_per_condition * len(doses)
    n_control_cells = _check_positive_int("n_control_cells", n_control_cells, minimum=0)
    n_genes = _check_positive_int("n_genes", n_genes)
    dx = _check_positive_int("n_latent_x", n_latent_x)
    dt = _check_positive_int("n_latent_t", n_latent_t)
    dtx = _check_positive_int("n_latent_tx", n_latent_tx)
    n_latent = dx + dt + dtx
    if n_genes < n_latent:
        raise ValueError(
            f"`n_genes` ({n_genes}) must be >= the total latent dimension "
            f"n_latent_x + n_latent_t + n_latent_tx = {n_latent} for an injective decoder."
        )
    doses_arr = np.asarray(list(doses), dtype=np.float64).ravel()
    if doses_arr.size == 0 or not np.all(np.isfinite(doses_arr)) or np.any(doses_arr <= 0):
        raise ValueError(f"`doses` must be a non-empty list of positive numbers, got {doses!r}.")
    if np.unique(doses_arr).size != doses_arr.size:
        raise ValueError(f"`doses` must be distinct, got {doses!r}.")
    interaction_strength = float(interaction_strength)
    if not (math.isfinite(interaction_strength) and interaction_strength >= 0):
        raise ValueError(f"`interaction_strength` must be >= 0, got {interaction_strength!r}.")
    sd_range = _check_sd_range("interaction_sd_range", interaction_sd_range)
    lib_mean, lib_sd = (float(v) for v in library_size)
    if not (math.isfinite(lib_mean) and math.isfinite(lib_sd) and lib_sd >= 0):
        raise ValueError(f"`library_size` must be (mean, sd >= 0), got {library_size!r}.")
    dispersion = float(dispersion)
    if not (math.isfinite(dispersion) and dispersion > 0):
        raise ValueError(f"`dispersion` must be > 0, got {dispersion!r}.")

    cell_lines = [f"cell_line_{i}" for i in range(n_cell_lines)]
    drugs = [f"drug_{k}" for k in range(n_treatments)]
    combo_names = [f"{a}+{b}" for a, b in _combination_parts(combinations, drugs)]
    rank = None
    if interaction_rank is not None:
        rank = _check_positive_int("interaction_rank", interaction_rank)

    # ---- generative parameters (the order of the draws fixes what a seed gives) -------
    rng = np.random.default_rng(seed)
    ec50 = _draw_dose_response(rng, n_treatments)
    mu_x, sd_x = _draw_law_x(rng, n_cell_lines, dx)
    m_t, s_t = _draw_law_t(rng, n_treatments, dt)
    m_tx, sd_tx = _draw_law_tx(rng, n_cell_lines, n_treatments, dtx, rank, sd_range)
    decoder = _draw_decoder(rng, n_latent, n_genes)
    theta = _draw_dispersion(rng, dispersion, n_genes)
    _calibrate_output_layer(rng, decoder)
    params: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "cell_lines": cell_lines,
        "drugs": drugs,
        "control": CONTROL,
        "combinations": combo_names,
        "doses": doses_arr,
        "ec50": ec50,
        "mu_x": mu_x,
        "sd_x": sd_x,
        "m_t": m_t,
        "s_t": s_t,
        "sd_t_control": _SD_T_CONTROL,
        "m_tx": m_tx,
        "sd_tx": sd_tx,
        "sd_tx_control": _SD_TX_CONTROL,
        "interaction_strength": interaction_strength,
        "decoder": decoder,
        "theta": theta,
        "scale_factor": SCALE_FACTOR,
        "library_size": np.array([lib_mean, lib_sd]),
    }
    model = _Model(params)
    holdout = _resolve_holdout(rng, n_holdout_pairs, cell_lines, drugs, combo_names)

    # ---- cells: condition, latents, expression, counts --------------------------------
    conditions = _conditions(
        model, drugs + combo_names, doses_arr, n_control_cells, n_cells_per_condition
    )
    cond_of_cell = _assign_cells(rng, conditions["n_cells"].to_numpy())
    c_idx = conditions["cell_line"].to_numpy()[cond_of_cell]
    h = model.hill(np.stack(conditions["t"].to_list())[cond_of_cell])
    z_x, z_t, z_tx = _draw_latents(rng, model, c_idx, h, (dx, dt, dtx))
    # decode the float32-rounded latents so that stored latents reproduce `expected` exactly
    rho = model.rho(np.concatenate([z_x, z_t, z_tx], axis=1).astype(np.float64))
    lib, counts = _draw_counts(rng, rho, theta, lib_mean, lib_sd)

    obs = _cell_obs(
        conditions,
        cond_of_cell,
        cell_lines,
        drugs + combo_names,
        holdout,
        lib,
        string_doses=len(combo_names) > 0,
    )
    params["holdout_pairs"] = [f"{cl}|{tr}" for cl, tr in holdout]
    params["params"] = {
        "n_cell_lines": n_cell_lines,
        "n_treatments": n_treatments,
        "doses": doses_arr,
        "n_cells_per_condition": n_cells_per_condition,
        "n_control_cells": n_control_cells,
        "n_genes": n_genes,
        "n_latent_x": dx,
        "n_latent_t": dt,
        "n_latent_tx": dtx,
        "interaction_strength": interaction_strength,
        "interaction_rank": -1 if interaction_rank is None else int(interaction_rank),
        "interaction_sd_range": np.array(sd_range),
        "n_holdout_pairs": len(holdout),
        "combinations": combo_names,
        "library_size": np.array([lib_mean, lib_sd]),
        "dispersion": dispersion,
        "as_sparse": bool(as_sparse),
        "seed": int(seed) if seed is not None else -1,
    }

    x_norm = _lognormalize(counts).astype(np.float32)
    counts = counts.astype(np.float32)
    return ad.AnnData(
        X=sparse.csr_matrix(x_norm) if as_sparse else x_norm,
        obs=obs,
        var=pd.DataFrame(index=pd.Index([f"gene_{g}" for g in range(n_genes)])),
        layers={
            "counts": sparse.csr_matrix(counts) if as_sparse else counts,
            "expected": model.expected(rho).astype(np.float32),
        },
        obsm={"z_x_true": z_x, "z_t_true": z_t, "z_tx_true": z_tx},
        uns={UNS_KEY: params},
    )


def _cell_indices(adata: ad.AnnData, indices: Any) -> np.ndarray:
    n = adata.n_obs
    if indices is None:
        return np.arange(n)
    if isinstance(indices, slice):
        return np.arange(n)[indices]
    idx = np.asarray(indices)
    if idx.ndim == 0:
        idx = idx[None]
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(f"Boolean `indices` must have length n_obs={n}.")
        return np.flatnonzero(idx)
    if idx.dtype.kind in "US" or idx.dtype == object:
        pos = adata.obs_names.get_indexer(idx.astype(str))
        if np.any(pos < 0):
            raise ValueError(f"Unknown obs name {idx[np.flatnonzero(pos < 0)[0]]!r}.")
        return pos
    if idx.dtype.kind not in "iu":
        raise ValueError("`indices` must be integer positions, a boolean mask or obs names.")
    if np.any(idx >= n) or np.any(idx < -n):
        raise ValueError(f"`indices` out of range for {n} cells.")
    return np.where(idx < 0, idx + n, idx)


def simulate_counterfactual(
    adata: ad.AnnData,
    treatment: str,
    dose: float | str | None = None,
    indices: Any = None,
    kind: Literal["expected", "counts", "lognorm"] = "expected",
    return_latents: bool = False,
    seed: int = 0,
) -> np.ndarray | tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Exact counterfactual expression of simulated cells under another treatment.

    For each selected cell, ``z_x`` and the standardised noises
    ``eps_t = (z_t - mu_t(t)) / sd_t(t)`` and ``eps_tx = (z_tx - mu_tx(x, t)) / sd_tx(x, t)``
    (under the cell's actual treatment ``t``) are kept; the latents are recomputed under the
    new treatment ``t'`` as ``z_t = mu_t(t') + sd_t(t') * eps_t`` and
    ``z_tx = mu_tx(x, t') + sd_tx(x, t') * eps_tx`` and decoded with the true decoder.

    Parameters
    ----------
    adata
        AnnData produced by :func:`simulate_screen` (or a subset / copy / h5ad round trip of
        one), with ``uns["fcr_simulation"]``, ``obs["cell_line"]``, ``obs["drug"]``,
        ``obs["dose"]`` and the ``obsm`` true latents.
    treatment
        A drug name, ``"control"``, or a combination ``"drug_a+drug_b"`` of known drugs
        (not necessarily one that was simulated).
    dose
        Dose of the treatment (> 0); ``None`` -> 1.0. For a combination, a number shared by
        all parts or a string ``"d1+d2"``. Must be ``None`` or 0 for ``"control"``.
    indices
        Cells to use: integer positions, a boolean mask or obs names; ``None`` -> all cells.
    kind
        ``"expected"``: noise-free ``log1p(1e4 * rho)``; ``"counts"``: NB counts drawn with
        each cell's own library size ``obs["library_size"]``; ``"lognorm"``:
        ``log1p(counts / total * 1e4)`` of such counts.
    return_latents
        Also return the counterfactual latents ``(z_x, z_t, z_tx)``.
    seed
        Seed of the count sampling (``kind`` ``"counts"`` / ``"lognorm"``).

    Returns
    -------
    ``(n_cells, n_genes)`` float64 array; with ``return_latents=True`` the tuple
    ``(array, (z_x, z_t, z_tx))``.

    Examples
    --------
    >>> import numpy as np
    >>> from fcr_tools.data import simulate_screen, simulate_counterfactual
    >>> adata = simulate_screen(n_cell_lines=2, n_treatments=2, n_cells_per_condition=5)
    >>> ctrl = np.flatnonzero(adata.obs["drug"] == "control")
    >>> y_cf = simulate_counterfactual(adata, "drug_1", dose=0.3, indices=ctrl)
    >>> y_cf.shape == (ctrl.size, adata.n_vars)
    True
    """
    if UNS_KEY not in adata.uns:
        raise ValueError(
            f'`adata.uns["{UNS_KEY}"]` is missing: simulate_counterfactual needs an AnnData '
            "created by fcr_tools.data.simulate_screen (or a subset/copy of one)."
        )
    if kind not in ("expected", "counts", "lognorm"):
        raise ValueError(f"`kind` must be 'expected', 'counts' or 'lognorm', got {kind!r}.")
    model = _Model(adata.uns[UNS_KEY])
    t_new = model.dose_vector(treatment, dose)  # validates treatment and dose
    idx = _cell_indices(adata, indices)

    obs = adata.obs.iloc[idx]
    cl = obs["cell_line"].astype(str).to_numpy()
    unknown = sorted(set(cl) - set(model.cell_lines))
    if unknown:
        raise ValueError(f"Unknown cell line {unknown[0]!r} in obs['cell_line'].")
    c_idx = np.asarray([model.cl_index[c] for c in cl], dtype=np.int64)

    # the cells' own treatments
    drug_col = obs["drug"].astype(str).to_numpy()
    dose_raw = obs["dose"]
    if pd.api.types.is_numeric_dtype(dose_raw.dtype):
        dose_col = [float(v) for v in dose_raw.to_numpy()]
    else:
        dose_col = dose_raw.astype(str).tolist()
    t_own = np.zeros((idx.size, len(model.drugs)))
    cache: dict[tuple[str, Any], np.ndarray] = {}
    for i, key in enumerate(zip(drug_col, dose_col, strict=True)):
        if key not in cache:
            cache[key] = model.dose_vector(key[0], key[1], default_dose=None)
        t_own[i] = cache[key]
    h_own = model.hill(t_own)
    h_new = np.broadcast_to(model.hill(t_new), h_own.shape)

    z_x = np.asarray(adata.obsm["z_x_true"], dtype=np.float64)[idx]
    z_t = np.asarray(adata.obsm["z_t_true"], dtype=np.float64)[idx]
    z_tx = np.asarray(adata.obsm["z_tx_true"], dtype=np.float64)[idx]

    mu, sd = model.law_t(h_own)
    eps_t = (z_t - mu) / sd
    mu, sd = model.law_t(h_new)
    z_t_cf = mu + sd * eps_t

    mu, sd = model.law_tx(c_idx, h_own)
    eps_tx = (z_tx - mu) / sd
    mu, sd = model.law_tx(c_idx, h_new)
    z_tx_cf = mu + sd * eps_tx

    rho = model.rho(np.concatenate([z_x, z_t_cf, z_tx_cf], axis=1))
    if kind == "expected":
        out = model.expected(rho)
    else:
        lib = obs["library_size"].to_numpy(dtype=np.float64)
        rng = np.random.default_rng(seed)
        counts = _sample_counts(rng, lib[:, None] * rho, model.theta)
        out = counts if kind == "counts" else _lognormalize(counts, model.scale_factor)
    if return_latents:
        return out, (z_x, z_t_cf, z_tx_cf)
    return out
