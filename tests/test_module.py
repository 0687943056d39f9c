"""FCRModule: the objective on a fixed minibatch, its gradients, and counterfactual decoding."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.nn import functional as F

from fcr_tools._constants import TREATMENT_DOSE_KEY
from fcr_tools._module import FCRModule, _permutation_bce, gaussian_kl
from fcr_tools._objective import LOSS_TERMS
from fcr_tools._pairing import FCRDataLoader

# distinct weights other than 1, so that a term counted with a wrong weight shows
WEIGHTS = {"kl_weight": 0.9} | {t.weight: 0.35 + 0.15 * i for i, t in enumerate(LOSS_TERMS)}
# weight -> the metrics that disappear with it (the first: the value the weight multiplies)
WEIGHT_METRICS = {t.weight: list(t.metrics) for t in LOSS_TERMS if t.metrics}
# the terms that log their values whatever their weights, each tested on its own below
ALWAYS_LOGGED = {"reconstruction_weight", "control_weight"}


def _batch(model, pair=True, n=120):
    loader = FCRDataLoader(model.adata_manager, batch_size=n, shuffle=True, pair_controls=pair)
    return next(iter(loader))


@pytest.fixture
def module_and_batch(adata, build_model):
    model = build_model(adata, train=False)
    module = model.module
    module.eval()  # no dropout: with a fixed torch seed a forward pass is reproducible
    return module, _batch(model)


def _loss(module, batch, **weights):
    torch.manual_seed(123)
    _, _, out = module(batch, loss_kwargs={**WEIGHTS, **weights})
    return out


def _metrics(out):
    return {k: float(v) for k, v in out.extra_metrics.items()}


def test_loss_is_finite_with_all_metrics(module_and_batch):
    module, batch = module_and_batch
    out = _loss(module, batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    metrics = _metrics(out)
    expected = {"nll_cell", "kl_cell"} | {m for ms in WEIGHT_METRICS.values() for m in ms}
    assert set(metrics) == expected
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    for key in ("kl_cell", "aggregate_kl", "covariate_ce", "treatment_ce", "adversarial"):
        assert metrics[key] >= 0, key
    assert 0.0 <= metrics["discriminator_accuracy"] <= 1.0
    assert -2.0 <= metrics["similarity"] <= 2.0
    assert 0.0 < metrics["x_invariance"] <= 1.0
    assert 0.0 < metrics["t_invariance"] <= 1.0
    n = batch["X"].shape[0]
    assert out.reconstruction_loss["reconstruction_loss"].shape == (n,)
    assert out.kl_local["kl_local"].shape == (n,)


def test_loss_is_reproducible_with_a_seed(module_and_batch):
    module, batch = module_and_batch
    assert _loss(module, batch).loss.item() == _loss(module, batch).loss.item()


def test_every_term_is_tested_here():
    # a term either logs metrics (tested by the parametrised test below) or has a test here
    assert {t.weight for t in LOSS_TERMS} - set(WEIGHT_METRICS) == ALWAYS_LOGGED


@pytest.mark.parametrize("weight", list(WEIGHT_METRICS))
def test_zero_weight_removes_its_metric_and_its_term(module_and_batch, weight):
    module, batch = module_and_batch
    full, without = _loss(module, batch), _loss(module, batch, **{weight: 0.0})
    removed = WEIGHT_METRICS[weight]
    assert all(m in full.extra_metrics for m in removed)
    assert not any(m in without.extra_metrics for m in removed)
    # the other metrics are unaffected
    kept = set(full.extra_metrics) - set(removed)
    assert kept == set(without.extra_metrics)
    for key in kept:
        torch.testing.assert_close(full.extra_metrics[key], without.extra_metrics[key])
    # and the loss loses exactly that weighted term
    term = WEIGHTS[weight] * full.extra_metrics[removed[0]]
    if weight == "aggregate_kl_weight":
        term = term * WEIGHTS["kl_weight"]
    assert abs(term.item()) > 1e-4
    torch.testing.assert_close(full.loss - without.loss, term, rtol=1e-4, atol=1e-3)


def _partner_terms(out, weight=WEIGHTS["control_weight"]):
    """``weight`` times the partners' reconstruction and KL terms (unweighted in the output)."""
    return tuple(
        weight * out.partner_metrics[f"{k}_partner"] for k in ("reconstruction_loss", "kl_local")
    )


def test_zero_reconstruction_weight(module_and_batch):
    module, batch = module_and_batch
    full, without = _loss(module, batch), _loss(module, batch, reconstruction_weight=0.0)
    rec = full.reconstruction_loss["reconstruction_loss"].mean() + _partner_terms(full)[0]
    assert "nll_cell" in without.extra_metrics
    torch.testing.assert_close(
        full.loss - without.loss, WEIGHTS["reconstruction_weight"] * rec, rtol=1e-4, atol=1e-3
    )


def test_zero_kl_weight(module_and_batch):
    module, batch = module_and_batch
    full, without = _loss(module, batch), _loss(module, batch, kl_weight=0.0)
    kl = full.kl_local["kl_local"].mean() + _partner_terms(full)[1]
    agg = full.extra_metrics["aggregate_kl"]
    expected = WEIGHTS["kl_weight"] * (kl + WEIGHTS["aggregate_kl_weight"] * agg)
    assert expected.item() > 0
    torch.testing.assert_close(full.loss - without.loss, expected, rtol=1e-4, atol=1e-3)


def test_per_cell_terms_are_the_cells_own(module_and_batch):
    """scvi-tools' reconstruction_loss / kl_local (hence elbo_*): the cells', no partners."""
    module, batch = module_and_batch
    n = batch["X"].shape[0]
    torch.manual_seed(123)
    out, gen, loss = module(batch, loss_kwargs=WEIGHTS)
    x = torch.cat([batch["X"], batch["control_X"]])
    nll = -gen["px"].log_prob(x).sum(-1)
    kl = sum(
        gaussian_kl(
            out[f"qz_{k}"].loc,
            out[f"qz_{k}"].scale ** 2,
            out[f"pz_{k}"].loc,
            out[f"pz_{k}"].scale ** 2,
        )
        for k in ("x", "t", "tx")
    )
    torch.testing.assert_close(loss.reconstruction_loss["reconstruction_loss"], nll[:n].detach())
    torch.testing.assert_close(loss.kl_local["kl_local"], kl[:n].detach())
    torch.testing.assert_close(loss.reconstruction_loss_sum / n, loss.extra_metrics["nll_cell"])
    # the partners' terms, unweighted, on their own
    partner = loss.partner_metrics
    assert set(partner) == {"reconstruction_loss_partner", "kl_local_partner", "elbo_partner"}
    torch.testing.assert_close(partner["reconstruction_loss_partner"], nll[n:].mean().detach())
    torch.testing.assert_close(partner["kl_local_partner"], kl[n:].mean().detach())
    torch.testing.assert_close(partner["elbo_partner"], (nll[n:] + kl[n:]).mean().detach())


def test_zero_control_weight_drops_the_partners_terms(module_and_batch):
    module, batch = module_and_batch
    full, without = _loss(module, batch), _loss(module, batch, control_weight=0.0)
    partner_nll, partner_kl = _partner_terms(full)
    assert partner_nll.item() > 0
    expected = WEIGHTS["reconstruction_weight"] * partner_nll + WEIGHTS["kl_weight"] * partner_kl
    torch.testing.assert_close(full.loss - without.loss, expected, rtol=1e-4, atol=1e-3)
    # the partners' logged terms do not depend on control_weight
    one = _loss(module, batch, control_weight=1.0)
    for key, value in one.partner_metrics.items():
        torch.testing.assert_close(full.partner_metrics[key], value)
    # with control_weight 0 they are not computed; the cells' own terms never change
    assert without.partner_metrics == {}
    for out in (without, one):
        torch.testing.assert_close(out.reconstruction_loss, full.reconstruction_loss)
        torch.testing.assert_close(out.kl_local, full.kl_local)


def test_partners_enter_as_untreated_cells_of_the_same_covariates(module_and_batch):
    module, batch = module_and_batch
    n = batch["X"].shape[0]
    inputs = module._get_inference_input(batch)
    assert inputs["n_primary"] == n
    torch.testing.assert_close(inputs["x"], torch.cat([batch["X"], batch["control_X"]]))
    torch.testing.assert_close(inputs["covs"][:n], inputs["covs"][n:])
    assert (inputs["t_idx"][n:] == module.n_treatment_components).all()
    assert (inputs["t_dose"][n:] == 0).all()
    torch.testing.assert_close(inputs["t_idx"][:n], batch["treatment_idx"])


def test_classifier_and_similarity_terms_by_hand(module_and_batch):
    module, batch = module_and_batch
    n = batch["X"].shape[0]
    torch.manual_seed(123)
    out, _, loss = module(batch, loss_kwargs=WEIGHTS)
    labels = torch.cat(
        [batch["treatment"].reshape(-1).long(), torch.full((n,), module.control_code)]
    )
    logits = module.treatment_classifier(torch.cat([out["z_t"], out["z_tx"]], -1))
    torch.testing.assert_close(
        loss.extra_metrics["treatment_ce"], F.cross_entropy(logits, labels).detach()
    )
    # similarity: cos(z_t, z_t of the partner) - cos(z_x, z_x of the partner), treated cells
    treated = (batch["treatment_dose"] > 0).any(-1)
    assert 0 < treated.sum() < n
    t, x = out["qz_t"].loc, out["qz_x"].loc
    sim = F.cosine_similarity(t[:n], t[n:], dim=-1) - F.cosine_similarity(x[:n], x[n:], dim=-1)
    torch.testing.assert_close(loss.extra_metrics["similarity"], sim[treated].mean().detach())


def test_unpaired_batch_has_no_similarity_term(module_and_batch):
    module, batch = module_and_batch
    unpaired = {k: v for k, v in batch.items() if k != "control_X"}
    out = _loss(module, unpaired)
    assert torch.isfinite(out.loss)
    assert "similarity" not in out.extra_metrics
    assert "treatment_ce" in out.extra_metrics
    assert out.partner_metrics == {}
    assert out.reconstruction_loss["reconstruction_loss"].shape == (batch["X"].shape[0],)


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_minibatches_give_a_finite_loss(adata, build_model, n):
    model = build_model(adata, train=False)
    module = model.module
    loader = FCRDataLoader(model.adata_manager, batch_size=n, pair_controls=True)
    for batch, _ in zip(loader, range(12), strict=False):  # controls and treated cells
        out = _loss(module, batch)
        assert torch.isfinite(out.loss)
        disc_loss, _ = module.discriminator_loss(module(batch, loss_kwargs=WEIGHTS)[0])
        assert torch.isfinite(disc_loss)


def _grads(module_part):
    return [p.grad for p in module_part.parameters()]


def _has_signal(module_part):
    return any(g is not None and g.abs().sum() > 0 for g in _grads(module_part))


def _silent(module_part):
    return all(g is None or (g == 0).all() for g in _grads(module_part))


def _backward_of_one_term(module, batch, weight: str, metrics: set[str]):
    """Backward pass of the term of ``weight`` alone (every other weight 0)."""
    only = {k: 0.0 for k in WEIGHTS} | {weight: 1.0}
    module.zero_grad(set_to_none=True)
    out = _loss(module, batch, **only)
    assert set(out.extra_metrics) == {"nll_cell", "kl_cell", *metrics}
    torch.testing.assert_close(out.loss, out.extra_metrics[WEIGHT_METRICS[weight][0]])
    out.loss.backward()


def _assert_silent(*parts):
    for part in parts:
        assert _silent(part)


def test_adversarial_gradient_reaches_the_encoders(module_and_batch):
    module, batch = module_and_batch
    _backward_of_one_term(
        module, batch, "adversarial_weight", {"adversarial", "discriminator_accuracy"}
    )
    for block in ("x", "t", "tx"):
        assert _has_signal(module.encoders[block]), block
    assert _has_signal(module.expression_encoder)
    # residual posteriors: a posterior mean is its prior mean plus the encoder's output, so
    # the encoder's loss reaches the prior networks too
    assert module.posterior == "residual" and _has_signal(module.priors)
    # nothing else in the objective: decoder and classifiers get no gradient
    _assert_silent(module.decoder, module.treatment_classifier, module.covariate_classifiers)


def test_x_invariance_gradient_reaches_z_x_only(module_and_batch):
    module, batch = module_and_batch
    _backward_of_one_term(module, batch, "x_invariance_weight", {"x_invariance"})
    # z_x's posterior mean: its encoder head and the shared expression layers (with residual
    # posteriors the prior mean of z_x is the same for a cell and its partner, and cancels)
    assert _has_signal(module.encoders["x"])
    assert _has_signal(module.expression_encoder)
    _assert_silent(
        module.encoders["t"],
        module.encoders["tx"],
        module.priors["t"],
        module.priors["tx"],
        module.decoder,
        module.treatment_classifier,
        module.covariate_classifiers,
        module.discriminators,
    )


def test_t_invariance_gradient_reaches_z_t_only(module_and_batch):
    module, batch = module_and_batch
    _backward_of_one_term(module, batch, "t_invariance_weight", {"t_invariance"})
    # z_t's posterior mean around its condition's mean: its encoder head, the shared
    # expression layers and the dose curve its head reads; with residual posteriors the prior
    # mean of z_t is the same for every cell of a condition and cancels (to rounding)
    assert _has_signal(module.encoders["t"])
    assert _has_signal(module.expression_encoder)
    head = max(g.abs().max().item() for g in _grads(module.encoders["t"]) if g is not None)
    prior = max((g.abs().max().item() for g in _grads(module.priors) if g is not None), default=0)
    assert prior < 1e-5 * head
    _assert_silent(
        module.encoders["x"],
        module.encoders["tx"],
        module.decoder,
        module.treatment_classifier,
        module.covariate_classifiers,
        module.discriminators,
    )


def test_x_invariance_is_zero_without_treated_cells(module_and_batch):
    module, batch = module_and_batch
    controls = dict(batch)
    controls[TREATMENT_DOSE_KEY] = torch.zeros_like(batch[TREATMENT_DOSE_KEY])
    out = _loss(module, controls)
    assert out.extra_metrics["x_invariance"].item() == 0.0
    assert torch.isfinite(out.loss)


def test_without_adversarial_term_the_discriminators_get_no_gradient(module_and_batch):
    module, batch = module_and_batch
    module.zero_grad(set_to_none=True)
    _loss(module, batch, adversarial_weight=0.0).loss.backward()
    assert _silent(module.discriminators)
    assert _has_signal(module.encoders["tx"])


def test_discriminator_loss_does_not_reach_the_encoders(module_and_batch):
    module, batch = module_and_batch
    torch.manual_seed(0)
    inference_outputs, _, _ = module(batch, loss_kwargs=WEIGHTS)
    module.zero_grad(set_to_none=True)
    loss, accuracy = module.discriminator_loss(inference_outputs)
    assert torch.isfinite(loss) and 0.0 <= accuracy.item() <= 1.0
    loss.backward()
    assert _has_signal(module.discriminators["x"])
    assert _has_signal(module.discriminators["t"])
    for part in (module.encoders, module.expression_encoder, module.decoder):
        assert _silent(part)


def test_gaussian_kl_matches_torch():
    torch.manual_seed(0)
    q_mean, p_mean = torch.randn(7, 5), torch.randn(7, 5)
    q_var, p_var = torch.rand(7, 5) + 0.05, torch.rand(7, 5) + 0.05
    expected = kl_divergence(Normal(q_mean, q_var.sqrt()), Normal(p_mean, p_var.sqrt())).sum(-1)
    out = gaussian_kl(q_mean, q_var, p_mean, p_var)
    assert out.shape == (7,)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gaussian_kl(q_mean, q_var, q_mean, q_var), torch.zeros(7))


def test_constructor_rejects_bad_likelihood():
    with pytest.raises(ValueError, match="'poisson'"):
        FCRModule(10, [2], 3, 4, 0, likelihood="poisson")


def _own_treatment(batch):
    return batch["treatment_idx"], batch["treatment_dose"]


@pytest.fixture(params=["gaussian", "nb"])
def cf_setup(request, adata, build_model):
    setup = {"layer": "counts"} if request.param == "nb" else {}
    model = build_model(adata, setup=setup, likelihood=request.param, train={"max_epochs": 1})
    module = model.module
    module.eval()
    return module, _batch(model, pair=False, n=60)


def test_counterfactual_prior_and_abduction_differ(cf_setup):
    module, batch = cf_setup
    prior = module.counterfactual(batch, *_own_treatment(batch), mode="prior")["mean"]
    abduction = module.counterfactual(batch, *_own_treatment(batch), mode="abduction")["mean"]
    assert prior.shape == abduction.shape == batch["X"].shape
    assert torch.isfinite(prior).all() and torch.isfinite(abduction).all()
    assert not torch.allclose(prior, abduction, rtol=1e-3, atol=1e-3)


def test_abduction_with_own_treatment_decodes_the_posterior_means(cf_setup):
    module, batch = cf_setup
    result = module.counterfactual(batch, *_own_treatment(batch), mode="abduction")
    with torch.no_grad():
        out = module.inference(**module._get_inference_input(batch))
        z = torch.cat([out[f"qz_{b}"].loc for b in ("x", "t", "tx")], -1)
        expected = module.generative(z, out["library"])
    torch.testing.assert_close(result["mean"], expected["px_mean"], rtol=1e-4, atol=1e-4)
    if module.likelihood == "nb":
        torch.testing.assert_close(result["scale"], expected["px_scale"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result["scale"].sum(-1), torch.ones(batch["X"].shape[0]))
        torch.testing.assert_close(result["mean"].sum(-1), batch["X"].sum(-1), rtol=1e-4, atol=0.5)
    else:
        assert "scale" not in result


def test_prior_mode_ignores_the_observed_treatment(cf_setup):
    module, batch = cf_setup
    target = (torch.zeros_like(batch["treatment_idx"]), torch.ones_like(batch["treatment_dose"]))
    relabelled = dict(batch)
    relabelled["treatment_idx"] = torch.roll(batch["treatment_idx"], 1, 0)
    relabelled["treatment_dose"] = torch.roll(batch["treatment_dose"], 1, 0)
    a = module.counterfactual(batch, *target, mode="prior")["mean"]
    b = module.counterfactual(relabelled, *target, mode="prior")["mean"]
    torch.testing.assert_close(a, b)
    a = module.counterfactual(batch, *target, mode="abduction")["mean"]
    b = module.counterfactual(relabelled, *target, mode="abduction")["mean"]
    assert not torch.allclose(a, b)


def test_counterfactual_depends_on_the_target(cf_setup):
    module, batch = cf_setup
    n, width = batch["treatment_idx"].shape
    padding = module.n_treatment_components
    control = torch.full((n, width), padding), torch.zeros(n, width)
    drug = torch.full((n, width), padding), torch.zeros(n, width)
    drug[0][:, 0], drug[1][:, 0] = 1, 1.0
    to_control = module.counterfactual(batch, *control)["mean"]
    to_drug = module.counterfactual(batch, *drug)["mean"]
    assert not torch.allclose(to_control, to_drug)


def test_counterfactual_rejects_unknown_mode(cf_setup):
    module, batch = cf_setup
    with pytest.raises(ValueError, match="'posterior'"):
        module.counterfactual(batch, *_own_treatment(batch), mode="posterior")


@pytest.mark.parametrize("fool", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_permutation_bce_is_the_mean_of_positives_and_negatives_over_valid_rows(fool, dtype):
    gen = torch.Generator().manual_seed(0)
    valid = torch.tensor([True, False, True, True, False, True])
    logits = {b: torch.randn(12, generator=gen, dtype=dtype) for b in ("x", "t")}
    loss, accuracy = _permutation_bce(logits, valid, fool=fool)
    expected_loss, expected_accuracy = 0.0, 0.0
    for both in logits.values():
        pos, neg = both[:6][valid], both[6:][valid]
        target = 0.0 if fool else 1.0
        bce = F.binary_cross_entropy_with_logits
        expected_loss += (
            bce(pos, torch.full_like(pos, target)) + bce(neg, torch.full_like(neg, 1 - target))
        ) / 2
        expected_accuracy += torch.cat([pos > 0, neg <= 0]).double().mean() / 2
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, expected_loss)
    assert float(accuracy) == pytest.approx(float(expected_accuracy))
    # no row with a partner: no loss, chance accuracy
    none = torch.zeros(6, dtype=torch.bool)
    loss, accuracy = _permutation_bce(logits, none, fool=fool)
    assert float(loss) == 0.0 and float(accuracy) == 0.5
