"""The model choices behind held-out prediction: residual posteriors, the centred interaction
embedding, the decoders and abduction counterfactuals."""

import numpy as np
import pytest
import torch

from conftest import SETUP, TINY, small_screen
from fcr_tools import FCRModel, FCRModule
from fcr_tools._nn import AdditiveDecoder, InteractionEmbedding, SkipDecoder


def _module(**kwargs) -> FCRModule:
    torch.manual_seed(0)
    return FCRModule(
        n_input=12,
        n_cats_per_cov=[3],
        n_treatment_components=2,
        n_treatment_categories=3,
        control_code=0,
        n_latent_x=2,
        n_latent_t=3,
        n_latent_tx=2,
        n_hidden=16,
        **kwargs,
    ).eval()


def _inputs(n=6):
    return {
        "x": torch.rand(n, 12),
        "covs": torch.tensor([[0], [1], [2], [0], [1], [2]])[:n],
        "t_idx": torch.tensor([[0], [1], [2], [2], [0], [1]])[:n],
        "t_dose": torch.tensor([[1.0], [0.5], [0.0], [0.0], [1.0], [1.0]])[:n],
    }


# ---------------------------------------------------------------- residual posteriors
def test_residual_posterior_is_the_prior_mean_plus_the_encoders_output():
    module = _module(posterior="residual")
    inputs = _inputs()
    with torch.no_grad():
        out = module.inference(**inputs)
        h = module.expression_encoder(inputs["x"])
        t = module.treatment_vector(inputs["t_idx"], inputs["t_dose"])
        offset, _ = module.encoders["t"](torch.cat([h, t], -1))
    torch.testing.assert_close(out["qz_t"].loc, out["pz_t"].loc + offset)


def test_free_posterior_does_not_depend_on_the_prior():
    module = _module(posterior="free")
    inputs = _inputs()
    with torch.no_grad():
        before = module.inference(**inputs)["qz_t"].loc.clone()
        module.priors["t"].net[-1].bias.add_(5.0)  # move the treatment prior
        after = module.inference(**inputs)["qz_t"].loc
    torch.testing.assert_close(before, after)


def test_unknown_posterior_is_rejected():
    with pytest.raises(ValueError, match="posterior must be 'free' or 'residual'"):
        _module(posterior="amortised")


# ---------------------------------------------------------------- interaction embedding
def test_interaction_embedding_is_centred_over_treated_categories_and_zero_elsewhere():
    emb = InteractionEmbedding([4], 3, treated=[[True, True, False, True]])
    with torch.no_grad():
        emb.tables[0].weight.normal_()
    codes = torch.arange(4)[:, None]
    values = emb(codes)
    torch.testing.assert_close(values[[0, 1, 3]].sum(0), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(values[2], torch.zeros(3))
    values.pow(2).sum().backward()
    assert emb.tables[0].weight.grad[2].abs().sum() == 0  # never shaped by treated cells


def test_interaction_embedding_starts_at_zero_and_checks_the_mask():
    emb = InteractionEmbedding([3, 2], 4)
    assert emb(torch.tensor([[0, 1], [2, 0]])).abs().sum() == 0
    with pytest.raises(ValueError, match="treated\\[0\\] must have 3 entries"):
        InteractionEmbedding([3], 4, treated=[[True, False]])


def test_unmeasured_context_gets_the_average_interaction(build_model):
    """A cell line never treated in training: its interaction prior is the mean of the others'."""
    adata = small_screen()
    keep = (adata.obs["cell_line"] != "cell_line_2") | (adata.obs["drug"] == "control")
    adata = adata[keep.to_numpy()].copy()
    model = build_model(adata, train={"max_epochs": 3})
    assert model.module.interaction_context == "centred"
    module = model.module
    t = torch.zeros(3, module.n_treatment_components)
    t[:, 1] = 1.0
    codes = torch.arange(3)[:, None]
    with torch.no_grad():
        e_x = module.covariate_embedding(codes)
        e_tx = module.interaction_context_embedding(codes, e_x)
        mean_tx = module.prior(e_x, t, e_tx)["tx"][0]
    torch.testing.assert_close(mean_tx[2], mean_tx[:2].mean(0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(mean_tx[0], mean_tx[1])  # the measured ones learned to differ


def test_shared_interaction_context_uses_the_covariate_embedding():
    module = _module(interaction_context="shared")
    assert not hasattr(module, "interaction_embedding")
    e_x = torch.randn(4, module.covariate_embedding.n_output)
    assert module.interaction_context_embedding(torch.zeros(4, 1, dtype=torch.long), e_x) is e_x


# ---------------------------------------------------------------- decoders
def test_additive_decoder_is_a_sum_over_blocks():
    torch.manual_seed(0)
    decoder = AdditiveDecoder([2, 3, 2], 10, 8, 2).eval()
    z = torch.randn(5, 7)
    other_t = z.clone()
    other_t[:, 2:5] = torch.randn(5, 3)
    other_x = z.clone()
    other_x[:, :2] = torch.randn(5, 2)
    both = other_t.clone()
    both[:, :2] = other_x[:, :2]
    with torch.no_grad():
        # changing z_t moves every cell's output by the same amount whatever its z_x
        torch.testing.assert_close(
            decoder(other_t) - decoder(z), decoder(both) - decoder(other_x), atol=1e-5, rtol=0
        )


def test_skip_decoder_adds_a_linear_map_of_the_latents():
    torch.manual_seed(0)
    decoder = SkipDecoder(7, 10, 8, 2)
    z = torch.randn(5, 7)
    torch.testing.assert_close(decoder(z), decoder.mlp(z) + z @ decoder.linear.weight.T)
    with torch.inference_mode():  # prediction's one-product path: the same map
        fast = decoder(z)
    torch.testing.assert_close(fast, (decoder.mlp(z) + z @ decoder.linear.weight.T).detach())


@pytest.mark.parametrize("decoder", ["mlp", "additive", "skip"])
@pytest.mark.parametrize("likelihood", ["gaussian", "nb"])
def test_each_decoder_trains_predicts_and_reloads(
    adata, build_model, tmp_path, decoder, likelihood
):
    setup = {"layer": "counts"} if likelihood == "nb" else None
    model = build_model(adata, setup=setup, likelihood=likelihood, decoder=decoder)
    controls = adata[adata.obs["drug"] == "control"].copy()
    pred = model.predict_counterfactual(controls, treatment="drug_1", dose=1.0)
    assert np.isfinite(pred.X).all()
    model.save(tmp_path / "m")
    loaded = FCRModel.load(tmp_path / "m", adata=adata)
    assert loaded.module.decoder_kind == decoder
    again = loaded.predict_counterfactual(controls, treatment="drug_1", dose=1.0)
    np.testing.assert_allclose(again.X, pred.X, rtol=1e-5, atol=1e-5)


def test_unknown_decoder_is_rejected(adata, build_model):
    with pytest.raises(ValueError, match="decoder must be"):
        build_model(adata, train=False, decoder="transformer")


# ---------------------------------------------------------------- counterfactual modes
def test_abduction_of_a_control_to_control_reconstructs_the_cell(adata, build_model):
    model = build_model(adata)
    controls = adata[adata.obs["drug"] == "control"].copy()
    pred = model.predict_counterfactual(controls, treatment="control", mode="abduction")
    module = model.module.eval()
    proxy = model._validate_anndata(controls)
    with torch.no_grad():
        tensors = next(iter(model._loader(proxy)))
        inputs = module._get_inference_input(tensors)
        inputs.pop("n_primary")
        out = module.inference(**inputs)
        z = torch.cat([out["qz_x"].loc, out["qz_t"].loc, out["qz_tx"].loc], -1)
        recon = module.generative(z, out["library"])["px_mean"].numpy()
    np.testing.assert_allclose(pred.X, recon, rtol=1e-5, atol=1e-5)


def test_default_counterfactual_mode_is_abduction(adata, build_model):
    model = build_model(adata)
    controls = adata[adata.obs["drug"] == "control"].copy()
    default = model.predict_counterfactual(controls, treatment="drug_0", dose=0.3)
    abduction = model.predict_counterfactual(
        controls, treatment="drug_0", dose=0.3, mode="abduction"
    )
    assert default.uns["fcr_counterfactual"]["mode"] == "abduction"
    np.testing.assert_array_equal(default.X, abduction.X)


def test_defaults_are_the_benchmarked_architecture():
    adata = small_screen()
    FCRModel.setup_anndata(adata, **SETUP)
    model = FCRModel(adata, **TINY)
    module = model.module
    assert (module.posterior, module.interaction_context) == ("residual", "centred")
    assert module.decoder_kind == "skip"
    # two doses per drug: a learned dose curve ("auto" -> "hill"), recorded as chosen
    assert module.dose_response is not None
    assert model.init_params_["non_kwargs"]["dose_response"] == "hill"


@pytest.mark.parametrize(
    "setup, overrides",
    [
        ({}, {"doses": (1.0,)}),  # one dose per drug
        ({"dose_key": None}, {}),  # no doses: every treated cell at dose 1
    ],
)
def test_auto_dose_response_keeps_doses_as_given_with_one_dose_per_treatment(setup, overrides):
    adata = small_screen(**overrides)
    FCRModel.setup_anndata(adata, **{**SETUP, **setup})
    model = FCRModel(adata, **TINY)
    assert model.module.dose_response is None
    assert model.init_params_["non_kwargs"]["dose_response"] == "linear"
    assert FCRModel(adata, **TINY, dose_response="hill").module.dose_response is not None


def test_auto_dose_response_is_rebuilt_as_chosen_on_other_data(adata, build_model, tmp_path):
    model = build_model(adata, train={"max_epochs": 1, "shrinkage": False})
    assert model.module.dose_response is not None  # two doses per drug
    model.save(tmp_path / "m")
    # the controls alone have no doses at all: the saved choice, not the data, decides
    controls = adata[adata.obs["drug"] == "control"].copy()
    loaded = FCRModel.load(tmp_path / "m", adata=controls)
    assert loaded.module.dose_response is not None
    torch.testing.assert_close(
        loaded.module.dose_response.log_half_dose, model.module.dose_response.log_half_dose
    )


# ---------------------------------------------------------------- dose response
def test_hill_dose_response_is_zero_at_zero_monotone_and_saturating():
    from fcr_tools._nn import HillDoseResponse

    response = HillDoseResponse(2)
    doses = torch.tensor([[0.0, 0.0], [0.01, 0.1], [0.1, 1.0], [1.0, 10.0], [100.0, 1e4]])
    g = response(doses)
    assert (g[0] == 0).all()
    assert (g[1:].diff(dim=0) > 0).all() and (g < 1).all()
    assert torch.isclose(g[2, 0], torch.tensor(0.5))  # half-maximal at the initial dose 0.1
    g.sum().backward()  # no NaN from log(0) at zero doses
    assert torch.isfinite(response.raw_hill.grad).all()
    assert torch.isfinite(response.log_half_dose.grad).all()


def test_linear_treatment_prior_with_hill_doses_trains(adata, build_model):
    model = build_model(adata, treatment_prior="linear", dose_response="hill")
    module = model.module
    assert module.dose_response is not None
    t = module.treatment_vector(torch.tensor([[0], [0]]), torch.tensor([[0.3], [1.0]]))
    mean = module.priors["t"](t)[0]
    assert not torch.allclose(mean[0], mean[1])  # the dose is not normalised away
    controls = adata[adata.obs["drug"] == "control"].copy()
    assert np.isfinite(model.predict_counterfactual(controls, treatment="drug_0").X).all()
    with pytest.raises(ValueError, match="dose_response must be 'auto', 'linear' or 'hill'"):
        build_model(adata.copy(), train=False, dose_response="emax")
    with pytest.raises(ValueError, match="treatment_prior must be"):
        build_model(adata.copy(), train=False, treatment_prior="deep")
