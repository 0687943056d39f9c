"""Training robustness: NaN / exploding losses stop training with advice; gradient clipping."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fcr_tools import FCRModel, FCRTrainingPlan

ADVICE = r"Try a lower learning rate \(plan_kwargs=\{'lr': \.\.\.\}\), gradient clipping"


def _model(adata, build_model):
    return build_model(adata, train=False)


def _train(model, **plan_kwargs):
    model.train(max_epochs=3, batch_size=64, enable_progress_bar=False, plan_kwargs=plan_kwargs)


def test_nan_loss_stops_training_with_advice(adata, build_model, monkeypatch):
    model = _model(adata, build_model)
    loss = model.module.loss
    calls = []

    def poisoned(*args, **kwargs):
        out = loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model.module, "loss", poisoned)
    with pytest.raises(
        FloatingPointError, match=rf"training loss became nan at epoch 0.*{ADVICE}"
    ):
        _train(model)
    assert not model.is_trained


def test_exploding_loss_stops_training_with_advice(adata, build_model):
    model = _model(adata, build_model)
    with pytest.raises(FloatingPointError, match=rf"training loss exploded to .*{ADVICE}"):
        _train(model, lr=1e4, gradient_clip_val=None)


def test_diverged_weights_stop_training_with_advice(adata, build_model):
    model = _model(adata, build_model)
    # NaN weights make torch.distributions refuse its parameters before any loss is computed
    with pytest.raises(FloatingPointError, match=rf"NaN or infinite values .*diverged.*{ADVICE}"):
        _train(model, lr=1e8, gradient_clip_val=None, max_loss_ratio=None)


def test_max_loss_ratio_must_exceed_one(trained_model):
    with pytest.raises(ValueError, match="max_loss_ratio must be > 1"):
        _train(trained_model, max_loss_ratio=0.5)


def test_gradient_clipping_under_manual_optimisation(adata, build_model, monkeypatch):
    calls = []
    clip = FCRTrainingPlan.clip_gradients

    def spy(self, optimizer, gradient_clip_val=None, **kwargs):
        calls.append(gradient_clip_val)
        return clip(self, optimizer, gradient_clip_val=gradient_clip_val, **kwargs)

    monkeypatch.setattr(FCRTrainingPlan, "clip_gradients", spy)
    model = _model(adata, build_model)
    before = _weights(model)
    model.train(
        max_epochs=1,
        batch_size=64,
        enable_progress_bar=False,
        plan_kwargs={"gradient_clip_val": 1e-9},
    )
    steps = 4  # 216 training cells in minibatches of 64
    assert calls == [1e-9] * (2 * steps)  # the autoencoder's and the discriminators' optimizers
    assert (_weights(model) - before).abs().max() < 1e-5  # gradients of norm 1e-9 barely move

    calls.clear()
    unclipped = _model(adata, build_model)
    before = _weights(unclipped)
    unclipped.train(
        max_epochs=1,
        batch_size=64,
        enable_progress_bar=False,
        plan_kwargs={"gradient_clip_val": None},
    )
    assert calls == []
    assert (_weights(unclipped) - before).abs().max() > 1e-4


def _weights(model):
    return torch.cat([p.detach().reshape(-1).clone() for p in model.module.parameters()])


def test_same_seed_same_latents_on_sparse_counts(make_screen, build_model):
    """Complements test_model.py::test_reproducible_with_the_same_seed (dense, gaussian)."""
    latents = []
    for _ in range(2):
        adata = make_screen(as_sparse=True)
        model = build_model(
            adata, setup={"layer": "counts"}, likelihood="nb", train={"max_epochs": 1}
        )
        latents.append(model.get_latent_representation())
    np.testing.assert_array_equal(latents[0], latents[1])
    assert isinstance(model, FCRModel) and torch.is_tensor(next(model.module.parameters()))


def test_a_failure_in_another_ddp_process_stops_this_one(trained_model, monkeypatch):
    """Under DDP the loss check is reduced over processes (min of the 'loss is fine' flags)."""
    plan = FCRTrainingPlan(trained_model.module)
    reduced = []

    def reduce(flag, reduce_op):
        reduced.append(reduce_op)
        return torch.zeros_like(flag)  # another process reports a bad loss

    strategy = SimpleNamespace(reduce=reduce)
    plan._trainer = SimpleNamespace(strategy=strategy, current_epoch=1, global_step=7)
    monkeypatch.setattr(FCRTrainingPlan, "use_sync_dist", property(lambda self: True))
    with pytest.raises(FloatingPointError, match="exploded in another process at epoch 1, step 7"):
        plan._check_finite(torch.tensor(3.0), "training")
    assert reduced == ["min"]
    strategy.reduce = lambda flag, reduce_op: flag  # every process is fine
    plan._check_finite(torch.tensor(3.0), "training")
