"""FCRTrainingPlan: alternating autoencoder and permutation-discriminator updates."""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager

import numpy as np
import torch
from scvi.train import TrainingPlan

from ._module import FCRModule
from ._scvi_compat import log_metrics_without_inference_mode

_ADVICE = (
    "Try a lower learning rate (plan_kwargs={'lr': ...}), gradient clipping "
    "(plan_kwargs={'gradient_clip_val': ...}), a lower adversarial_weight, and check that the "
    "data match the likelihood (log-normalised for 'gaussian', raw counts for 'nb')."
)

LOSS_WEIGHTS = (
    "reconstruction_weight",
    "control_weight",
    "aggregate_kl_weight",
    "covariate_classifier_weight",
    "treatment_classifier_weight",
    "similarity_weight",
    "adversarial_weight",
)


def _checked_weight(name: str, value) -> float:
    """A loss weight as a float: any finite real number >= 0 (numpy scalars too), not a bool.

    Parameters
    ----------
    name
        The weight's argument name, for the error message.
    value
        The weight given.

    Returns
    -------
    float
        ``value`` as a Python float.

    Raises
    ------
    ValueError
        For a bool, a non-number, a complex number, NaN, an infinite or a negative value.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    if not (ok and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}.")
    return float(value)


class FCRTrainingPlan(TrainingPlan):
    """Lightning module that trains an :class:`~fcr_tools.FCRModule`.

    Each step first updates the encoders, priors, decoder and classifiers on the full FCR
    objective (the encoders play against the discriminators), then takes
    ``n_discriminator_steps`` updates of the two permutation discriminators, on the same
    minibatch's latents detached from the encoder.

    **Logged metrics** (``model.history``; each with a ``_train`` and a ``_validation``
    version unless named otherwise):

    - ``train_loss`` and ``validation_loss``: the whole weighted objective that the
      autoencoder update minimises (every term below with its weight, the KL terms with the
      current warm-up weight, the adversarial term against the discriminators of the moment).
    - ``elbo``, ``reconstruction_loss``, ``kl_local`` (scvi-tools' names and meaning): the
      cells' own negative ELBO per cell and its two parts, unweighted (no
      ``reconstruction_weight``, no warm-up). The control partners are not in them.
    - ``elbo_partner``, ``reconstruction_loss_partner``, ``kl_local_partner``: the same for
      the control partners, unweighted (the objective adds ``control_weight`` times them);
      not logged when ``control_weight`` is 0.
    - ``nll_cell``, ``kl_cell``, ``aggregate_kl``, ``covariate_ce``, ``treatment_ce``,
      ``similarity``, ``adversarial``: each term of the objective, unweighted (``nll_cell``
      and ``kl_cell`` equal ``reconstruction_loss`` and ``kl_local``); a term with weight 0
      is not logged.
    - ``discriminator_accuracy`` (0.5: the discriminators are fooled) and
      ``discriminator_loss_train``, the discriminators' own loss (training only).

    **Early stopping** (``model.train(early_stopping=True)``) watches ``elbo_validation``, the
    validation cells' own negative ELBO, and not ``validation_loss``. The ELBO measures how
    well the generative model fits cells it was not trained on, which is what should stop
    improving when training goes on too long, and it is comparable from one epoch to the
    next. ``validation_loss`` is not: its adversarial term is the value of a two-player game
    that rises whenever the discriminators get better, its KL weight changes during warm-up,
    and its classifier and similarity terms are regularisers of the latent space rather than
    fit. ``validation_loss`` stays the whole objective so that it can be compared with
    ``train_loss``; pass ``early_stopping_monitor="validation_loss"`` to watch it anyway.

    Parameters
    ----------
    module
        The FCR module.
    lr, weight_decay, eps
        Adam settings of the autoencoder optimizer.
    discriminator_lr
        Learning rate of the discriminators' Adam optimizer.
    n_discriminator_steps
        Discriminator updates per autoencoder update (0 disables their training).
    gradient_clip_val
        Clip the gradient norm of each optimizer's parameters to this value (``None``: off).
    max_loss_ratio
        Stop with an error when the training loss grows beyond this multiple of its first
        value (an exploding loss; ``None``: off). A NaN or infinite loss always stops training.
    n_epochs_kl_warmup, n_steps_kl_warmup, max_kl_weight, min_kl_weight
        KL warm-up as in :class:`scvi.train.TrainingPlan`; ``max_kl_weight`` is the weight of
        the KL terms.
    reconstruction_weight
        Weight of the reconstruction negative log-likelihood.
    control_weight
        Weight of the control partner's reconstruction and KL, relative to the cell's.
    aggregate_kl_weight
        Weight of the per-condition (moment-matched) KL.
    covariate_classifier_weight
        Weight of the covariate classifiers on z_x.
    treatment_classifier_weight
        Weight of the treatment classifier on (z_t, z_tx).
    similarity_weight
        Weight of the similarity term cos(z_t, z_t0) - cos(z_x, z_x0).
    adversarial_weight
        Weight of the encoder's loss against the permutation discriminators.
    **kwargs
        Other :class:`scvi.train.TrainingPlan` arguments.

    Examples
    --------
    The model builds the plan; its arguments are passed as ``plan_kwargs``:

    >>> model.train(
    ...     max_epochs=100,
    ...     plan_kwargs={"lr": 3e-4, "adversarial_weight": 0.5, "n_discriminator_steps": 2},
    ... )  # doctest: +SKIP
    """

    def __init__(
        self,
        module: FCRModule,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        discriminator_lr: float = 1e-3,
        n_discriminator_steps: int = 1,
        gradient_clip_val: float | None = 50.0,
        max_loss_ratio: float | None = 1e6,
        n_epochs_kl_warmup: int | None = 10,
        n_steps_kl_warmup: int | None = None,
        max_kl_weight: float = 1.0,
        min_kl_weight: float = 0.0,
        reconstruction_weight: float = 1.0,
        control_weight: float = 1.0,
        aggregate_kl_weight: float = 1.0,
        covariate_classifier_weight: float = 1.0,
        treatment_classifier_weight: float = 1.0,
        similarity_weight: float = 1.0,
        adversarial_weight: float = 1.0,
        **kwargs,
    ):
        given = {name: value for name, value in locals().items() if name in LOSS_WEIGHTS}
        weights = {name: _checked_weight(name, value) for name, value in given.items()}
        if n_discriminator_steps < 0:
            raise ValueError("n_discriminator_steps must be >= 0.")
        if max_loss_ratio is not None and not max_loss_ratio > 1:
            raise ValueError(f"max_loss_ratio must be > 1 or None, got {max_loss_ratio!r}.")
        if kwargs.get("reduce_lr_on_plateau"):
            raise ValueError("reduce_lr_on_plateau is not supported by FCRTrainingPlan.")
        super().__init__(
            module,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
            n_steps_kl_warmup=n_steps_kl_warmup,
            max_kl_weight=max_kl_weight,
            min_kl_weight=min_kl_weight,
            **weights,
            **kwargs,
        )
        self.discriminator_lr = discriminator_lr
        self.n_discriminator_steps = n_discriminator_steps
        self.gradient_clip_val = gradient_clip_val
        self.max_loss_ratio = max_loss_ratio
        self._first_loss: float | None = None
        self.automatic_optimization = False

    @property
    def _train_discriminators(self) -> bool:
        return self.n_discriminator_steps > 0 and self.loss_kwargs["adversarial_weight"] > 0

    def configure_optimizers(self):
        """One Adam optimizer for the autoencoder, one for the discriminators."""
        disc_ids = {id(p) for p in self.module.discriminators.parameters()}
        ae_params = [
            p for p in self.module.parameters() if p.requires_grad and id(p) not in disc_ids
        ]
        ae = self.get_optimizer_creator()(ae_params)
        disc_params = [p for p in self.module.discriminators.parameters() if p.requires_grad]
        if not disc_params:
            return ae
        disc = torch.optim.Adam(
            disc_params, lr=self.discriminator_lr, eps=self.eps, weight_decay=self.weight_decay
        )
        return [ae, disc]

    def _optimizers(self):
        opts = self.optimizers()
        if isinstance(opts, list | tuple):
            return opts[0], opts[1]
        return opts, None

    def _where(self) -> str:
        return f"epoch {self.current_epoch}, step {self.global_step}"

    def _check_finite(self, loss: torch.Tensor, what: str):
        """Stop on a NaN / infinite loss, or a training loss that exploded (in any process)."""
        value = loss.detach().item()  # one host sync per check
        ok = math.isfinite(value)
        problem = f"The {what} loss became {value}"
        if ok and what == "training" and self.max_loss_ratio is not None:
            if self._first_loss is None:
                self._first_loss = max(abs(value), 1.0)
            if abs(value) > self.max_loss_ratio * self._first_loss:
                ok = False
                problem = (
                    f"The training loss exploded to {value:.4g} (over max_loss_ratio="
                    f"{self.max_loss_ratio:g} times its first value)"
                )
        flag = torch.tensor(float(ok), device=loss.device)
        if self.use_sync_dist:  # under DDP every process stops, not only the one that failed
            flag = self.trainer.strategy.reduce(flag, reduce_op="min")
            if ok and flag.item() < 1:
                problem = f"The {what} loss became non-finite or exploded in another process"
        if flag.item() < 1:
            raise FloatingPointError(f"{problem} at {self._where()}. {_ADVICE}")

    @contextmanager
    def _diverged_as_error(self, what: str):
        """Turn torch.distributions' complaint about NaN parameters into advice."""
        try:
            yield
        except ValueError as err:
            if "invalid values" not in str(err):
                raise
            raise FloatingPointError(
                f"The model produced NaN or infinite values in the {what} step at "
                f"{self._where()}: its weights diverged. {_ADVICE}"
            ) from err

    def validation_step(self, batch, batch_idx):
        """scvi-tools' validation step, with a clear error if the weights diverged."""
        with self._diverged_as_error("validation"):
            return super().validation_step(batch, batch_idx)

    def compute_and_log_metrics(self, loss_output, metrics, mode: str):
        """Log the loss terms as scvi-tools does, then the control partners' terms.

        scvi-tools' ``elbo_*``, ``reconstruction_loss_*`` and ``kl_local_*`` are the cells'
        own; the partners' are logged as ``reconstruction_loss_partner_*``,
        ``kl_local_partner_*`` and ``elbo_partner_*``. All under ``no_grad`` instead of
        inference mode: metrics created in inference mode cannot be synchronised between DDP
        processes.
        """
        with torch.no_grad():
            log_metrics_without_inference_mode(self, loss_output, metrics, mode)
            for key, value in getattr(loss_output, "partner_metrics", {}).items():
                self.log(
                    f"{key}_{mode}",
                    value,
                    on_step=self.on_step,
                    on_epoch=self.on_epoch,
                    batch_size=loss_output.n_obs_minibatch,
                    sync_dist=self.use_sync_dist,
                )

    def training_step(self, batch, batch_idx):
        """One autoencoder update, then the discriminator updates."""
        kl_weight = self.kl_weight
        self.loss_kwargs.update({"kl_weight": kl_weight})
        self.log("kl_weight", kl_weight, on_step=True, on_epoch=False)
        opt_ae, opt_disc = self._optimizers()

        with self._diverged_as_error("training"):
            inference_outputs, _, loss_output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        loss = loss_output.loss
        self._check_finite(loss, "training")
        opt_ae.zero_grad()
        self.manual_backward(loss)
        if self.gradient_clip_val is not None:
            self.clip_gradients(opt_ae, gradient_clip_val=self.gradient_clip_val)
        opt_ae.step()

        self.log(
            "train_loss",
            loss.detach(),
            on_step=self.on_step,
            on_epoch=self.on_epoch,
            prog_bar=True,
            sync_dist=self.use_sync_dist,
        )
        self.compute_and_log_metrics(loss_output, self.train_metrics, "train")

        if opt_disc is not None and self._train_discriminators:
            for _ in range(self.n_discriminator_steps):
                with self._diverged_as_error("discriminator"):
                    disc_loss, _ = self.module.discriminator_loss(inference_outputs)
                self._check_finite(disc_loss, "discriminator")
                opt_disc.zero_grad()
                self.manual_backward(disc_loss)
                if self.gradient_clip_val is not None:
                    self.clip_gradients(opt_disc, gradient_clip_val=self.gradient_clip_val)
                opt_disc.step()
            self.log(
                "discriminator_loss_train",
                disc_loss.detach(),
                on_step=self.on_step,
                on_epoch=self.on_epoch,
                sync_dist=self.use_sync_dist,
            )
        return loss.detach()
