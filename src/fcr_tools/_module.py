"""FCRModule: the torch maths of FCR (inference, generative model, objective)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from scvi.distributions import NegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal
from torch.nn import functional as F

from ._constants import (
    CONTROL_X_KEY,
    COVARIATES_KEY,
    TREATMENT_DOSE_KEY,
    TREATMENT_IDX_KEY,
    TREATMENT_KEY,
    X_KEY,
)
from ._groups import (
    between_group_share,
    group_index,
    moment_matched,
    spread_share,
    within_group_derangement,
)
from ._nn import (
    MLP,
    AdditiveDecoder,
    CovariateEmbedding,
    Discriminator,
    GaussianHead,
    HillDoseResponse,
    InteractionEmbedding,
    SkipDecoder,
)
from ._objective import LossWeights, with_loss_weights
from ._treatments import dense_treatment

COUNTERFACTUAL_MODES = ("prior", "sample", "abduction")
_MIN_SCALE = 1e-2


def gaussian_kl_per_dim(
    q_mean: torch.Tensor, q_var: torch.Tensor, p_mean: torch.Tensor, p_var: torch.Tensor
) -> torch.Tensor:
    """KL(N(q) || N(p)) of diagonal Gaussians, one value per dimension."""
    squared = q_var + (q_mean - p_mean) ** 2
    return 0.5 * (torch.log(p_var) - torch.log(q_var) + squared / p_var - 1)


def gaussian_kl(
    q_mean: torch.Tensor, q_var: torch.Tensor, p_mean: torch.Tensor, p_var: torch.Tensor
) -> torch.Tensor:
    """KL(N(q) || N(p)) of diagonal Gaussians, summed over the last dimension."""
    return gaussian_kl_per_dim(q_mean, q_var, p_mean, p_var).sum(-1)


@dataclass
class FCRLossOutput(LossOutput):
    """scvi-tools' :class:`~scvi.module.base.LossOutput` plus the control partners' terms.

    ``reconstruction_loss`` and ``kl_local`` are the cells' own, so that scvi-tools'
    ``elbo_*``, ``reconstruction_loss_*`` and ``kl_local_*`` metrics are the cells' negative
    ELBO and its two parts. ``partner_metrics`` holds the partners' mean reconstruction
    negative log-likelihood and KL, unweighted (the objective adds ``control_weight`` times
    them), under ``reconstruction_loss_partner`` and ``kl_local_partner``, and their sum under
    ``elbo_partner``; it is empty when the minibatch has no partners or ``control_weight`` is 0.
    """

    partner_metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_choice(name: str, value, options: tuple[str, ...]) -> None:
    """``ValueError`` naming the argument, its allowed values and the value given."""
    if value not in options:
        allowed = ", ".join(f"'{o}'" for o in options[:-1]) + f" or '{options[-1]}'"
        raise ValueError(f"{name} must be {allowed}, not {value!r}.")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


class FCRModule(BaseModuleClass):
    """Factorized causal representation VAE with three latent blocks.

    Parameters
    ----------
    n_input
        Number of genes.
    n_cats_per_cov
        Number of categories of each covariate (empty: no covariates).
    n_treatment_components
        Length of the treatment vector (single treatments, control excluded).
    n_treatment_categories
        Number of treatment labels (control and combinations included), the classes of the
        treatment classifier.
    control_code
        Code of the control label among the treatment labels.
    n_latent_x, n_latent_t, n_latent_tx
        Sizes of the covariate, treatment and interaction blocks.
    n_hidden
        Width of every hidden layer.
    n_layers
        Hidden layers of the expression encoder and the decoder.
    n_covariate_embed
        Embedding size of each covariate.
    dropout_rate
        Dropout in the expression encoder.
    likelihood
        ``"gaussian"`` for log-normalised data, ``"nb"`` for raw counts.
    interaction_prior
        ``"linear"`` (default) or ``"mlp"`` (one hidden layer, the paper's): the network of
        p(z_tx | x, t) on k_t(t) * e_x(x).
    posterior
        ``"residual"``: posterior means are the conditional prior means plus the encoders'
        output; ``"free"``: the encoders' output.
    decoder
        ``"skip"`` (MLP plus a linear map of the latents), ``"mlp"`` or ``"additive"`` (one
        network per block, summed).
    interaction_context
        ``"centred"`` (an interaction embedding of its own, centred over the covariate
        categories with treated cells) or ``"shared"`` (the covariate embedding).
    treatment_prior
        ``"mlp"`` or ``"linear"``: the network of p(z_t | t).
    dose_response
        ``"linear"`` or ``"hill"`` (a learned saturating dose response per treatment).
    treated_categories
        Per covariate, which categories had treated cells in training (for
        ``interaction_context="centred"``; ``None``: all).

    Examples
    --------
    Models build their module themselves (``model.module``); on its own:

    >>> import torch
    >>> from fcr_tools import FCRModule
    >>> module = FCRModule(
    ...     n_input=10,
    ...     n_cats_per_cov=[2],
    ...     n_treatment_components=3,
    ...     n_treatment_categories=4,
    ...     control_code=0,
    ... )
    >>> out = module.inference(
    ...     x=torch.rand(5, 10),
    ...     covs=torch.zeros(5, 1, dtype=torch.long),
    ...     t_idx=torch.full((5, 1), 3),
    ...     t_dose=torch.zeros(5, 1),
    ... )
    >>> out["z"].shape  # z_x, z_t and z_tx of 5 cells
    torch.Size([5, 48])
    """

    def __init__(
        self,
        n_input: int,
        n_cats_per_cov: Sequence[int],
        n_treatment_components: int,
        n_treatment_categories: int,
        control_code: int,
        n_latent_x: int = 16,
        n_latent_t: int = 16,
        n_latent_tx: int = 16,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_covariate_embed: int = 16,
        dropout_rate: float = 0.1,
        likelihood: Literal["gaussian", "nb"] = "gaussian",
        interaction_prior: Literal["linear", "mlp"] = "linear",
        posterior: Literal["residual", "free"] = "residual",
        decoder: Literal["skip", "mlp", "additive"] = "skip",
        interaction_context: Literal["centred", "shared"] = "centred",
        treatment_prior: Literal["mlp", "linear"] = "mlp",
        dose_response: Literal["linear", "hill"] = "linear",
        treated_categories: Sequence[Sequence[bool]] | None = None,
    ):
        super().__init__()
        for name, value, options in [
            ("interaction_context", interaction_context, ("shared", "centred")),
            ("treatment_prior", treatment_prior, ("mlp", "linear")),
            ("dose_response", dose_response, ("linear", "hill")),
            ("decoder", decoder, ("skip", "mlp", "additive")),
            ("posterior", posterior, ("free", "residual")),
            ("likelihood", likelihood, ("gaussian", "nb")),
            ("interaction_prior", interaction_prior, ("mlp", "linear")),
        ]:
            _check_choice(name, value, options)
        self.interaction_context = interaction_context
        self.decoder_kind = decoder
        self.posterior = posterior
        self.interaction_prior = interaction_prior
        self.likelihood = likelihood
        self.n_input = n_input
        self.n_cats_per_cov = list(n_cats_per_cov)
        self.n_treatment_components = n_treatment_components
        self.control_code = control_code
        self.n_latent = {"x": n_latent_x, "t": n_latent_t, "tx": n_latent_tx}
        n_latent_total = n_latent_x + n_latent_t + n_latent_tx

        self.covariate_embedding = CovariateEmbedding(self.n_cats_per_cov, n_covariate_embed)
        n_cov = self.covariate_embedding.n_output
        n_t = n_treatment_components

        # q(z | x, t, y): a shared expression embedding, one head per block
        self.expression_encoder = nn.Sequential(
            MLP(n_input, n_hidden, n_hidden, n_layers - 1, dropout_rate),
            nn.LayerNorm(n_hidden),
            nn.ReLU(),
        )
        self.encoders = nn.ModuleDict(
            {
                "x": GaussianHead(n_hidden + n_cov, n_latent_x, n_hidden, 1),
                "t": GaussianHead(n_hidden + n_t, n_latent_t, n_hidden, 1),
                "tx": GaussianHead(n_hidden + n_cov + n_t, n_latent_tx, n_hidden, 1),
            }
        )
        # p(z_x | x), p(z_t | t), p(z_tx | x, t) with k_t(t) * e_x(x); k_t has no bias so
        # that controls (t = 0) share one interaction prior in every context.
        self.treatment_to_covariate = nn.Linear(n_t, n_cov, bias=False)
        self.dose_response = HillDoseResponse(n_t) if dose_response == "hill" else None
        if interaction_context == "centred":
            self.interaction_embedding = InteractionEmbedding(
                self.n_cats_per_cov, n_covariate_embed, treated_categories
            )
        self.priors = nn.ModuleDict(
            {
                "x": GaussianHead(n_cov, n_latent_x, n_hidden, 1),
                "t": GaussianHead(n_t, n_latent_t, n_hidden, 1 if treatment_prior == "mlp" else 0),
                # "linear": mean and variance parameters linear in k_t(t) * e_x(x) (a
                # bilinear interaction law), which extrapolates to unmeasured pairs more safely
                "tx": GaussianHead(
                    n_cov, n_latent_tx, n_hidden, 1 if interaction_prior == "mlp" else 0
                ),
            }
        )
        if treatment_prior == "linear":
            # treatment embeddings of unit scale from the start (as CPA's), so that the
            # decoder sees the treatments clearly apart before it learns their effects
            with torch.no_grad():
                self.priors["t"].net[-1].weight[:n_latent_t].normal_(0.0, 1.0)
        if decoder == "additive":
            self.decoder = AdditiveDecoder(
                [n_latent_x, n_latent_t, n_latent_tx], n_input, n_hidden, n_layers
            )
        elif decoder == "skip":
            self.decoder = SkipDecoder(n_latent_total, n_input, n_hidden, n_layers)
        else:
            self.decoder = MLP(n_latent_total, n_input, n_hidden, n_layers)
        # gene-wise Gaussian scale or NB inverse dispersion
        self.px_r = nn.Parameter(torch.zeros(n_input))

        # causal-structure classifiers (trained with the autoencoder)
        self.covariate_classifiers = nn.ModuleList(
            MLP(n_latent_x, n_cats, n_hidden, 1) for n_cats in self.n_cats_per_cov
        )
        self.treatment_classifier = MLP(
            n_latent_t + n_latent_tx, n_treatment_categories, n_hidden, 1
        )
        # permutation discriminators (own optimizer, see FCRTrainingPlan)
        self.discriminators = nn.ModuleDict(
            {
                "x": Discriminator(n_latent_x + n_latent_tx, n_hidden // 2),
                "t": Discriminator(n_latent_t + n_latent_tx, n_hidden // 2),
            }
        )

    # ------------------------------------------------------------------ inputs
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        x = tensors[X_KEY]
        covs = tensors.get(COVARIATES_KEY)
        if covs is None:
            covs = torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)
        covs = covs.long()
        t_idx = tensors[TREATMENT_IDX_KEY].long()
        t_dose = tensors[TREATMENT_DOSE_KEY].float()
        n_primary = x.shape[0]
        if CONTROL_X_KEY in tensors:
            # the control partners share the covariates and have no treatment: one pass for both
            x = torch.cat([x, tensors[CONTROL_X_KEY]], dim=0)
            covs = torch.cat([covs, covs], dim=0)
            t_idx = torch.cat([t_idx, torch.full_like(t_idx, self.n_treatment_components)])
            t_dose = torch.cat([t_dose, torch.zeros_like(t_dose)])
        return {"x": x, "covs": covs, "t_idx": t_idx, "t_dose": t_dose, "n_primary": n_primary}

    def _get_generative_input(self, tensors, inference_outputs, **kwargs) -> dict:
        return {"z": inference_outputs["z"], "library": inference_outputs["library"]}

    # ------------------------------------------------------------------ model
    def treatment_vector(self, t_idx: torch.Tensor, t_dose: torch.Tensor) -> torch.Tensor:
        """Dense dose-scaled multi-hot treatment vectors (through the dose response, if any).

        Examples
        --------
        Component indices and doses (index ``n_treatment_components`` pads):

        >>> t = module.treatment_vector(
        ...     torch.tensor([[0, 3], [1, 2]]), torch.tensor([[0.5, 0.0], [1.0, 0.25]])
        ... )  # doctest: +SKIP
        >>> t.tolist()  # doctest: +SKIP
        [[0.5, 0.0, 0.0], [0.0, 1.0, 0.25]]
        """
        t = dense_treatment(t_idx, t_dose, self.n_treatment_components)
        return t if self.dose_response is None else self.dose_response(t)

    def interaction_context_embedding(self, covs: torch.Tensor, e_x: torch.Tensor) -> torch.Tensor:
        """The context's embedding in the interaction prior (``e_x`` itself when shared)."""
        if self.interaction_context == "centred":
            return self.interaction_embedding(covs)
        return e_x

    def prior(
        self, e_x: torch.Tensor, t: torch.Tensor, e_tx: torch.Tensor | None = None
    ) -> dict[str, tuple]:
        """Means and variances of the conditional priors of the three blocks.

        ``e_tx`` is the context's embedding in the interaction prior
        (:meth:`interaction_context_embedding`); ``None`` uses ``e_x``.

        Examples
        --------
        >>> prior = module.prior(out["e_x"], torch.zeros(5, 3))  # doctest: +SKIP
        >>> mean, var = prior["tx"]  # doctest: +SKIP
        """
        context = e_x if e_tx is None else e_tx
        return {
            "x": self.priors["x"](e_x),
            "t": self.priors["t"](t),
            "tx": self.priors["tx"](self.treatment_to_covariate(t) * context),
        }

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        covs: torch.Tensor,
        t_idx: torch.Tensor,
        t_dose: torch.Tensor,
        n_primary: int | None = None,
    ) -> dict:
        """Posterior and prior of each block, and one sample of each.

        Examples
        --------
        >>> out = module.inference(**module._get_inference_input(tensors))  # doctest: +SKIP
        >>> out["qz_tx"].loc  # posterior means of z_tx  # doctest: +SKIP
        """
        library = x.sum(-1, keepdim=True)
        x_in = torch.log1p(x) if self.likelihood == "nb" else x
        h = self.expression_encoder(x_in)
        e_x = self.covariate_embedding(covs)
        t = self.treatment_vector(t_idx, t_dose)
        posterior = {
            "x": self.encoders["x"](torch.cat([h, e_x], -1)),
            "t": self.encoders["t"](torch.cat([h, t], -1)),
            "tx": self.encoders["tx"](torch.cat([h, e_x, t], -1)),
        }
        e_tx = self.interaction_context_embedding(covs, e_x)
        prior = self.prior(e_x, t, e_tx)
        if self.posterior == "residual":
            # the encoders give each cell's deviation from its conditional prior mean
            posterior = {k: (prior[k][0] + mean, var) for k, (mean, var) in posterior.items()}
        out = {"library": library, "covs": covs, "t_idx": t_idx, "t_dose": t_dose, "e_x": e_x}
        out["e_tx"] = e_tx
        out["n_primary"] = x.shape[0] if n_primary is None else n_primary
        for block, (mean, var) in posterior.items():
            out[f"qz_{block}"] = Normal(mean, var.sqrt())
            out[f"pz_{block}"] = Normal(prior[block][0], prior[block][1].sqrt())
            out[f"z_{block}"] = out[f"qz_{block}"].rsample()
        out["z"] = torch.cat([out["z_x"], out["z_t"], out["z_tx"]], -1)
        means = torch.cat([out[f"qz_{b}"].loc for b in ("x", "t", "tx")], -1)
        scales = torch.cat([out[f"qz_{b}"].scale for b in ("x", "t", "tx")], -1)
        out["qz"] = Normal(means, scales)
        return out

    @auto_move_data
    def generative(self, z: torch.Tensor, library: torch.Tensor) -> dict:
        """Likelihood of the expression given the three blocks.

        Examples
        --------
        >>> gen = module.generative(out["z"], out["library"])  # doctest: +SKIP
        >>> gen["px_mean"].shape  # cells x genes  # doctest: +SKIP
        """
        gen = self.expected_expression(z, library)
        if self.likelihood == "gaussian":
            scale = F.softplus(self.px_r) + _MIN_SCALE
            gen["px"] = Normal(gen["px_mean"], scale.expand_as(gen["px_mean"]))
        else:
            theta = torch.exp(self.px_r).expand_as(gen["px_mean"])
            gen["px"] = NegativeBinomial(mu=gen["px_mean"], theta=theta)
        return gen

    def expected_expression(self, z: torch.Tensor, library: torch.Tensor) -> dict:
        """The likelihood's mean given the blocks, without building the distribution.

        ``{"px_mean": ...}`` on the registered data's scale; for the negative binomial also
        ``"px_scale"`` (expression proportions, summing to 1 per cell). :meth:`generative`
        adds the distribution; prediction needs the mean only.
        """
        out = self.decoder(z)
        if self.likelihood == "gaussian":
            return {"px_mean": out}
        px_scale = torch.softmax(out, dim=-1)
        return {"px_mean": library * px_scale, "px_scale": px_scale}

    # ------------------------------------------------------------------ objective
    def _groups(self, inference_outputs: dict) -> tuple[torch.Tensor, int]:
        """(covariate, treatment, dose) group of every row (cells and partners).

        Computed once per minibatch and kept in ``inference_outputs``, so the loss and the
        discriminator steps of a training step share it.
        """
        out = inference_outputs
        if "groups" not in out:
            out["groups"] = group_index(out["covs"], out["t_idx"], out["t_dose"])
        return out["groups"]

    def permutation_logits(
        self, inference_outputs: dict, groups, n_groups, detach: bool = False
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Discriminator logits on same-cell pairs and within-group shuffled pairs.

        For each discriminator (``"x"``: (z_x, z_tx); ``"t"``: (z_t, z_tx)) returns the logits
        of the positives, of the negatives (z_tx taken from another cell of the same
        covariate-treatment group) and the mask of rows that have such a cell.

        Examples
        --------
        >>> groups, n_groups = module._groups(out)  # doctest: +SKIP
        >>> positive, negative, valid = module.permutation_logits(out, groups, n_groups)[
        ...     "x"
        ... ]  # doctest: +SKIP
        """
        stacked, valid = self._stacked_permutation_logits(
            inference_outputs, groups, n_groups, detach
        )
        n = valid.shape[0]
        return {block: (both[:n], both[n:], valid) for block, both in stacked.items()}

    def _stacked_permutation_logits(
        self, inference_outputs: dict, groups, n_groups, detach: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`permutation_logits` with positives and negatives in one ``(2n,)`` tensor.

        Each discriminator sees its positive and negative pairs in one pass (fewer, larger
        products than two passes; the same logits).
        """
        z = {b: inference_outputs[f"z_{b}"] for b in ("x", "t", "tx")}
        if detach:
            z = {b: v.detach() for b, v in z.items()}
        partner, valid = within_group_derangement(groups, n_groups)
        z_tx = torch.cat([z["tx"], z["tx"][partner]])
        logits = {
            block: disc(torch.cat([z[block], z[block]]), z_tx)
            for block, disc in self.discriminators.items()
        }
        return logits, valid

    def discriminator_loss(self, inference_outputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of the discriminators on detached latents, and their accuracy.

        Examples
        --------
        >>> loss, accuracy = module.discriminator_loss(out)  # doctest: +SKIP
        """
        groups, n_groups = self._groups(inference_outputs)
        logits, valid = self._stacked_permutation_logits(
            inference_outputs, groups, n_groups, detach=True
        )
        return _permutation_bce(logits, valid, fool=False)

    @with_loss_weights
    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
        **weights: float,
    ) -> FCRLossOutput:
        """The FCR objective for one minibatch.

        The minibatch holds ``B`` cells and, during training, one control partner per cell
        (same covariates, no treatment), stacked after them. Terms with a weight of 0 are not
        computed. ``loss`` is the whole weighted objective; ``reconstruction_loss`` and
        ``kl_local`` are the cells' own per-cell terms, unweighted (their sum is the cells'
        negative ELBO); the partners' terms are in ``partner_metrics`` (see
        ``FCRLossOutput``).

        Parameters
        ----------
        tensors
            The minibatch.
        inference_outputs, generative_outputs
            Outputs of :meth:`inference` and :meth:`generative` on it.
        kl_weight
            Weight of the KL terms (the training plan's, with its warm-up).
        {loss weights}

        Returns
        -------
        FCRLossOutput
            The loss, the per-cell terms and the metrics.

        Examples
        --------
        >>> _, _, loss_output = module(tensors, loss_kwargs={"kl_weight": 0.1})  # doctest: +SKIP
        >>> loss_output.extra_metrics["discriminator_accuracy"]  # doctest: +SKIP
        """
        w = LossWeights(**weights)  # checked, defaults for those not given
        out = inference_outputs
        b = out["n_primary"]
        paired = out["z"].shape[0] > b
        x = torch.cat([tensors[X_KEY], tensors[CONTROL_X_KEY]]) if paired else tensors[X_KEY]

        nll = -generative_outputs["px"].log_prob(x).sum(-1)
        # the three blocks side by side: one KL over all latent dimensions
        q_mean, q_var = out["qz"].loc, out["qz"].scale ** 2
        p_mean = torch.cat([out[f"pz_{k}"].loc for k in ("x", "t", "tx")], -1)
        p_var = torch.cat([out[f"pz_{k}"].scale for k in ("x", "t", "tx")], -1) ** 2
        kl = gaussian_kl(q_mean, q_var, p_mean, p_var)
        rec_cell, kl_cell = nll[:b], kl[:b]
        rec_total, kl_total = rec_cell, kl_cell  # per cell: its own terms plus its partner's
        partner_metrics = {}
        if paired and w.control_weight > 0:
            rec_total = rec_total + w.control_weight * nll[b:]
            kl_total = kl_total + w.control_weight * kl[b:]
            rec_partner, kl_partner = nll[b:].mean().detach(), kl[b:].mean().detach()
            partner_metrics = {
                "reconstruction_loss_partner": rec_partner,
                "kl_local_partner": kl_partner,
                "elbo_partner": rec_partner + kl_partner,
            }
        loss = w.reconstruction_weight * rec_total.mean() + kl_weight * kl_total.mean()
        metrics = {"nll_cell": rec_cell.mean().detach(), "kl_cell": kl_cell.mean().detach()}

        need_groups = (
            w.aggregate_kl_weight > 0
            or w.adversarial_weight > 0
            or (w.x_invariance_weight > 0 and paired)
            or w.t_invariance_weight > 0
        )
        groups, n_groups = self._groups(out) if need_groups else (None, 0)

        if w.aggregate_kl_weight > 0:
            # per dimension, so all blocks at once: the sum over blocks of their group KLs
            q_m, q_v = moment_matched(q_mean, q_var, groups, n_groups)
            p_m, p_v = moment_matched(p_mean, p_var, groups, n_groups)
            agg = gaussian_kl(q_m, q_v, p_m, p_v).mean()
            loss = loss + w.aggregate_kl_weight * kl_weight * agg
            metrics["aggregate_kl"] = agg.detach()

        if w.covariate_classifier_weight > 0 and self.covariate_classifiers:
            ce = sum(
                F.cross_entropy(clf(out["z_x"]), out["covs"][:, i])
                for i, clf in enumerate(self.covariate_classifiers)
            ) / len(self.covariate_classifiers)
            loss = loss + w.covariate_classifier_weight * ce
            metrics["covariate_ce"] = ce.detach()

        if w.treatment_classifier_weight > 0:
            labels = tensors[TREATMENT_KEY].reshape(-1).long()
            if paired:
                labels = torch.cat([labels, torch.full_like(labels, self.control_code)])
            logits = self.treatment_classifier(torch.cat([out["z_t"], out["z_tx"]], -1))
            ce = F.cross_entropy(logits, labels)
            loss = loss + w.treatment_classifier_weight * ce
            metrics["treatment_ce"] = ce.detach()

        treated = (out["t_dose"][:b] > 0).any(-1)  # the cells that have a treatment
        if w.similarity_weight > 0 and paired:
            mean_x, mean_t = out["qz_x"].loc, out["qz_t"].loc
            sim = F.cosine_similarity(mean_t[:b], mean_t[b:], dim=-1) - F.cosine_similarity(
                mean_x[:b], mean_x[b:], dim=-1
            )
            sim = _masked_mean(sim, treated)
            loss = loss + w.similarity_weight * sim
            metrics["similarity"] = sim.detach()

        if w.x_invariance_weight > 0 and paired:
            # z_x holds the context, not the treatment: a treated cell's z_x minus its control
            # partner's (same covariates) should not depend on the cell's condition
            mean_x = out["qz_x"].loc
            diff = (mean_x[:b] - mean_x[b:]) * treated[:, None]
            invariance = between_group_share(diff, groups[:b], n_groups)
            loss = loss + w.x_invariance_weight * invariance
            metrics["x_invariance"] = invariance.detach()

        if w.t_invariance_weight > 0:
            # z_t's law depends on the treatment alone: within a (treatment, dose), the
            # spread of z_t around its condition's mean should be alike in every context
            strata, n_strata = group_index(out["t_idx"], out["t_dose"])
            invariance = spread_share(out["qz_t"].loc, groups, n_groups, strata, n_strata)
            loss = loss + w.t_invariance_weight * invariance
            metrics["t_invariance"] = invariance.detach()

        if w.adversarial_weight > 0:
            logits, valid = self._stacked_permutation_logits(out, groups, n_groups, False)
            fool, accuracy = _permutation_bce(logits, valid, fool=True)
            loss = loss + w.adversarial_weight * fool
            metrics["adversarial"] = fool.detach()
            metrics["discriminator_accuracy"] = accuracy

        return FCRLossOutput(
            loss=loss,
            reconstruction_loss=rec_cell,
            kl_local=kl_cell,
            extra_metrics=metrics,
            partner_metrics=partner_metrics,
        )

    # ------------------------------------------------------------------ prediction
    def counterfactual_latents(
        self,
        inference_outputs: dict,
        t: torch.Tensor,
        mode: Literal["prior", "sample", "abduction"] = "prior",
    ) -> dict[str, torch.Tensor]:
        """Latent blocks of the cells of ``inference_outputs`` under treatment vectors ``t``.

        ``"x"`` is each cell's posterior mean of z_x; ``"t"`` and ``"tx"`` are the prior means
        of p(z_t | t) and p(z_tx | x, t) (``"prior"`` mode), plus each cell's own deviation
        from the prior mean of its observed treatment (``"abduction"`` mode), or one draw from
        the priors of the target treatment (``"sample"`` mode). Shared by
        :meth:`counterfactual` and :func:`fcr_tools.tl.interaction_effects`.

        Examples
        --------
        >>> blocks = module.counterfactual_latents(out, torch.zeros(5, 3))  # doctest: +SKIP
        >>> z = torch.cat([blocks["x"], blocks["t"], blocks["tx"]], -1)  # doctest: +SKIP
        """
        out = inference_outputs
        prior = self.prior(out["e_x"], t, out["e_tx"])
        z_t, z_tx = prior["t"][0], prior["tx"][0]
        if mode == "abduction":
            z_t = z_t + out["qz_t"].loc - out["pz_t"].loc
            z_tx = z_tx + out["qz_tx"].loc - out["pz_tx"].loc
        elif mode == "sample":
            z_t = z_t + prior["t"][1].sqrt() * torch.randn_like(z_t)
            z_tx = z_tx + prior["tx"][1].sqrt() * torch.randn_like(z_tx)
        else:
            _check_choice("mode", mode, COUNTERFACTUAL_MODES)
        return {"x": out["qz_x"].loc, "t": z_t, "tx": z_tx}

    @torch.inference_mode()
    def counterfactual(
        self,
        tensors: dict[str, torch.Tensor],
        target_idx: torch.Tensor,
        target_dose: torch.Tensor,
        mode: Literal["prior", "sample", "abduction"] = "abduction",
    ) -> dict[str, torch.Tensor]:
        """Expected expression of the cells under a target treatment.

        z_x is the posterior mean of each cell. In ``"prior"`` mode z_t and z_tx are the prior
        means under the target treatment; in ``"sample"`` mode one draw from those priors; in
        ``"abduction"`` mode each cell also keeps its own deviation from the prior mean of its
        observed treatment.

        Examples
        --------
        >>> idx, dose = model.treatment_encoder.encode_one("drug_1", 1.0, n=5)  # doctest: +SKIP
        >>> module.counterfactual(
        ...     tensors, torch.as_tensor(idx), torch.as_tensor(dose)
        ... )["mean"]  # doctest: +SKIP
        """
        inputs = self._get_inference_input(tensors)
        inputs.pop("n_primary")
        out = self.inference(**inputs)
        device = out["e_x"].device
        t_new = self.treatment_vector(target_idx.to(device), target_dose.to(device).float())
        blocks = self.counterfactual_latents(out, t_new, mode=mode)
        z = torch.cat([blocks["x"], blocks["t"], blocks["tx"]], -1)
        gen = self.expected_expression(z, out["library"])
        result = {"mean": gen["px_mean"]}
        if self.likelihood == "nb":
            result["scale"] = gen["px_scale"]
        return result


def _permutation_bce(
    logits: dict[str, torch.Tensor], valid: torch.Tensor, fool: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy of the discriminators (positives = 1) or of fooling them (flipped).

    ``logits`` holds each discriminator's positives then negatives (``(2n,)``); rows without
    a valid partner (``valid`` False) count in neither. Returns the loss summed over
    discriminators (each the mean of its positives' and its negatives' mean) and the accuracy
    of telling them apart, averaged over discriminators (0.5 without any valid row), without
    a host synchronisation.
    """
    n = valid.shape[0]
    dtype = next(iter(logits.values())).dtype  # the logits' (float64 or half models too)
    weight = torch.cat([valid, valid]).to(dtype)
    n_valid = valid.sum()
    denominator = (2 * n_valid).clamp(min=1).to(dtype)
    is_positive = torch.arange(2 * n, device=valid.device) < n
    target = (~is_positive if fool else is_positive).to(dtype)
    total, accuracy = 0.0, 0.0
    for both in logits.values():
        loss = F.binary_cross_entropy_with_logits(both, target, reduction="none")
        total = total + (loss * weight).sum() / denominator
        correct = ((both.detach() > 0) == is_positive).to(dtype)
        accuracy = accuracy + (correct * weight).sum() / denominator
    accuracy = torch.where(n_valid > 0, accuracy / len(logits), torch.full_like(accuracy, 0.5))
    return total, accuracy.detach()
