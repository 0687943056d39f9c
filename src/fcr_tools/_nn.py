"""Neural-network building blocks of the FCR module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

_MIN_VAR = 1e-4


class MLP(nn.Sequential):
    """Fully connected network: ``n_layers`` hidden layers (Linear, LayerNorm, ReLU, Dropout).

    Parameters
    ----------
    n_input, n_output
        Input and output widths.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers; 0 gives a single linear map.
    dropout_rate
        Dropout after each hidden layer.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_hidden: int = 128,
        n_layers: int = 2,
        dropout_rate: float = 0.0,
    ):
        layers: list[nn.Module] = []
        width = n_input
        for _ in range(n_layers):
            layers += [nn.Linear(width, n_hidden), nn.LayerNorm(n_hidden), nn.ReLU()]
            if dropout_rate > 0:
                layers.append(nn.Dropout(dropout_rate))
            width = n_hidden
        layers.append(nn.Linear(width, n_output))
        super().__init__(*layers)


class GaussianHead(nn.Module):
    """MLP returning the mean and variance of a diagonal Gaussian."""

    def __init__(self, n_input: int, n_latent: int, n_hidden: int, n_layers: int, dropout=0.0):
        super().__init__()
        self.net = MLP(n_input, 2 * n_latent, n_hidden, n_layers, dropout)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_var = self.net(inputs).chunk(2, dim=-1)
        return mean, F.softplus(raw_var) + _MIN_VAR


class CovariateEmbedding(nn.Module):
    """One embedding table per covariate, concatenated.

    With no covariates, every cell gets the same learned vector, so the rest of the model
    needs no special case.
    """

    def __init__(self, n_cats_per_cov: Sequence[int], n_embed: int):
        super().__init__()
        sizes = list(n_cats_per_cov) or [1]
        self.has_covariates = bool(n_cats_per_cov)
        self.tables = nn.ModuleList(nn.Embedding(n, n_embed) for n in sizes)
        self.n_output = n_embed * len(sizes)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if not self.has_covariates:
            codes = torch.zeros(codes.shape[0], 1, dtype=torch.long, device=codes.device)
        return torch.cat([table(codes[:, i]) for i, table in enumerate(self.tables)], dim=-1)


class Discriminator(nn.Module):
    """Binary classifier on a pair of latent blocks (one logit per cell)."""

    def __init__(self, n_input: int, n_hidden: int = 64, n_layers: int = 2):
        super().__init__()
        self.net = MLP(n_input, 1, n_hidden, n_layers)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a, b], dim=-1)).squeeze(-1)
