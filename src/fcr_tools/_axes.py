"""The axes of z_tx: the rotation under which its conditional law is closest to diagonal.

FCR's prior gives z_tx a diagonal Gaussian law in each (covariate, treatment, dose)
condition, with variances that change from one condition to the next. That change is what
makes z_tx's axes identifiable (a rotation of the true axes no longer has a diagonal law in
every condition), but the likelihood that tells the axes apart is weak and training settles
on a rotation of them. After training, FCRModel finds the rotation of its z_tx under which
the cells' aggregate posterior in each condition is closest to diagonal, and reports z_tx in
those axes. A rotation keeps every distance, so neighbour graphs, UMAPs and clusters of z_tx
are unchanged; only the axes (what each column of ``X_fcr_tx`` means) move.

The criterion is the Gaussian one for sources whose variances change between conditions
(Pham and Cardoso, 2001): the total correlation of the rotated covariances,
``0.5 * sum_c w_c * (sum_i log (R C_c R^T)_ii - log det C_c)``, nats per cell, with ``C_c``
condition ``c``'s aggregate posterior covariance and ``w_c`` its share of the cells. It is 0
when every rotated covariance is diagonal.
"""

from __future__ import annotations

import numpy as np
import torch

#: starting points of the search: the identity (no rotation), then the eigenvectors of random
#: combinations of the conditions' covariances (exact when they share eigenvectors)
N_STARTS = 3
#: L-BFGS iterations from each starting point
MAX_ITER = 100
#: total correlation (nats per cell) below which there is nothing to align
TOLERANCE = 1e-4


def condition_covariances(
    mean: np.ndarray, var: np.ndarray, groups: np.ndarray, min_cells: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate posterior covariance of each condition, and its number of cells.

    The aggregate posterior of a condition is the equal-weight mixture of its cells'
    posteriors: covariance of the posterior means plus the mean posterior variance (so it is
    positive definite even for few cells). Conditions with fewer than ``min_cells`` cells are
    left out.

    Parameters
    ----------
    mean, var
        Posterior means and variances ``(n_cells, d)``.
    groups
        Condition of each cell ``(n_cells,)``, any labels.
    min_cells
        Smallest condition used.

    Returns
    -------
    ``(n_conditions, d, d)`` covariances and ``(n_conditions,)`` cell counts.
    """
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    d = mean.shape[1]
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    codes = codes.reshape(-1)
    if not len(codes):
        return np.zeros((0, d, d)), np.zeros(0)
    # the cells of each condition as one slice of a single sort (no pass over all cells per
    # condition: screens have thousands of conditions and millions of cells)
    order = np.argsort(codes, kind="stable")
    ends = np.cumsum(np.bincount(codes))
    covs, counts = [], []
    for start, end in zip(np.concatenate([[0], ends[:-1]]), ends, strict=True):
        n = int(end - start)
        if n < min_cells:
            continue
        rows = order[start:end]
        centred = mean[rows] - mean[rows].mean(0)
        covs.append(centred.T @ centred / n + np.diag(var[rows].mean(0)))
        counts.append(n)
    return np.asarray(covs, dtype=np.float64).reshape(-1, d, d), np.asarray(counts, float)


def total_correlation(covs: np.ndarray, counts: np.ndarray, rotation=None) -> float:
    """Mean total correlation (nats per cell) of the conditions' Gaussians, rotated first.

    ``0.5 * (sum_i log C_ii - log det C)`` of each ``C = R C_c R^T``, weighted by the
    conditions' cell counts. 0 when every ``C`` is diagonal.
    """
    if len(covs) == 0:
        return 0.0
    if rotation is not None:
        covs = np.einsum("ij,cjk,lk->cil", rotation, covs, rotation)
    diag = np.log(np.einsum("cii->ci", covs)).sum(1)
    logdet = np.linalg.slogdet(covs)[1]
    weights = counts / counts.sum()
    return float(0.5 * (weights * (diag - logdet)).sum())


def _starting_rotations(covs: np.ndarray, counts: np.ndarray, seed: int) -> list[np.ndarray]:
    """The identity, then the eigenvectors (as rows) of random combinations of the covariances.

    If the covariances are all diagonal in one basis, so is any combination of them, and its
    eigenvectors are that basis (when its eigenvalues differ), so these starts are close to
    the answer when the conditions nearly share axes.
    """
    d = covs.shape[-1]
    rng = np.random.default_rng(seed)
    starts = [np.eye(d)]
    weights = counts / counts.sum()
    for _ in range(N_STARTS - 1):
        mix = np.einsum("c,cij->ij", weights * rng.standard_normal(len(covs)), covs)
        starts.append(np.linalg.eigh(mix)[1].T)
    return starts


def fit_rotation(covs: np.ndarray, counts: np.ndarray, seed: int = 0) -> np.ndarray:
    """The rotation ``R`` that minimises the total correlation of ``R C_c R^T``.

    From each of the :func:`starting rotations <_starting_rotations>` ``R_0``, L-BFGS
    searches ``R = exp(S - S^T) R_0`` (``exp`` of a skew-symmetric matrix is a rotation);
    the best end point is kept, and the identity when nothing improves on it (or the total
    correlation is below ``TOLERANCE`` to begin with).

    Parameters
    ----------
    covs, counts
        From :func:`condition_covariances`.
    seed
        Seed of the random combinations.

    Returns
    -------
    ``(d, d)`` orthogonal matrix (float64): the aligned coordinates are ``z @ R.T``.
    """
    d = covs.shape[-1] if covs.ndim == 3 else 0
    identity = np.eye(d)
    best, best_value = identity, total_correlation(covs, counts)
    if len(covs) == 0 or d < 2 or not best_value > TOLERANCE:
        return identity
    target = torch.as_tensor(covs, dtype=torch.float64)
    weights = torch.as_tensor(counts / counts.sum(), dtype=torch.float64)

    for start in _starting_rotations(covs, counts, seed):
        base = torch.as_tensor(start, dtype=torch.float64)
        skew = torch.zeros(d, d, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([skew], max_iter=MAX_ITER, line_search_fn="strong_wolfe")

        def rotation_of(skew=skew, base=base):
            return torch.linalg.matrix_exp(skew - skew.T) @ base

        def closure(optimizer=optimizer, rotation_of=rotation_of):
            optimizer.zero_grad()
            rotation = rotation_of()
            diag = torch.einsum("ij,cjk,ik->ci", rotation, target, rotation)
            value = 0.5 * (weights[:, None] * torch.log(diag)).sum()
            value.backward()
            return value

        with torch.enable_grad():
            optimizer.step(closure)
        with torch.no_grad():
            rotation = rotation_of().numpy()
        value = total_correlation(covs, counts, rotation)
        if np.isfinite(value) and value < best_value - 1e-9:
            best, best_value = rotation, value
    return best
