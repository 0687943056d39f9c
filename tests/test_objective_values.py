"""The objective's values on one fixed minibatch, recorded.

Performance work (vectorised group statistics, one read for cells and partners, cached group
ids, ...) must leave the objective unchanged: the values of the MLP interaction prior were
recorded with the code before that work (commit 6804e5e) and reproduced after it; those of
the linear prior (0.1's default) when it was added; those of the 0.2 architecture (residual
posteriors, centred interaction context, skip decoder) when it became the default, with the
0.1 ones reproduced unchanged. A change to the objective itself (a new term, another default
weight) must update them on purpose, with a changelog entry.
"""

import pytest
import scvi
import torch

from conftest import SETUP, TINY
from fcr_tools import FCRModel
from fcr_tools._pairing import FCRDataLoader

# the architecture of fcr_tools 0.1 (its interaction prior is a separate key)
V01 = {"posterior": "free", "interaction_context": "shared", "decoder": "mlp"}
ARCHITECTURES = {
    "linear": {**V01, "interaction_prior": "linear"},
    "mlp": {**V01, "interaction_prior": "mlp"},
    "0.2": {},
}

# (likelihood, architecture) -> values; "mlp" values recorded before the performance work
RECORDED = {
    ("gaussian", "0.2"): {
        "loss": 1767.532715,
        "nll_cell": 867.580261,
        "kl_cell": 1.279594,
        "aggregate_kl": 1.239497,
        "covariate_ce": 1.204808,
        "treatment_ce": 1.688238,
        "similarity": -0.041223,
        "adversarial": 1.396159,
        "discriminator_accuracy": 0.5,
    },
    ("nb", "0.2"): {
        "loss": 365.768341,
        "nll_cell": 178.187027,
        "kl_cell": 1.303813,
        "aggregate_kl": 1.254043,
        "covariate_ce": 1.20357,
        "treatment_ce": 1.690024,
        "similarity": -0.037508,
        "adversarial": 1.396662,
        "discriminator_accuracy": 0.503968,
    },
    ("gaussian", "linear"): {
        "loss": 1730.815674,
        "nll_cell": 853.948242,
        "kl_cell": 1.508171,
        "aggregate_kl": 1.430524,
        "covariate_ce": 1.077352,
        "treatment_ce": 1.565752,
        "similarity": 0.014867,
        "adversarial": 1.445081,
        "discriminator_accuracy": 0.505291,
    },
    ("nb", "linear"): {
        "loss": 347.395264,
        "nll_cell": 169.52652,
        "kl_cell": 1.533974,
        "aggregate_kl": 1.445047,
        "covariate_ce": 1.083494,
        "treatment_ce": 1.560997,
        "similarity": 0.052967,
        "adversarial": 1.445575,
        "discriminator_accuracy": 0.501323,
    },
    ("gaussian", "mlp"): {
        "loss": 1800.786133,
        "nll_cell": 885.529785,
        "kl_cell": 3.239949,
        "aggregate_kl": 3.09096,
        "covariate_ce": 1.102459,
        "treatment_ce": 1.504259,
        "similarity": 0.014867,
        "adversarial": 1.582189,
        "discriminator_accuracy": 0.5,
    },
    ("nb", "mlp"): {
        "loss": 368.22818,
        "nll_cell": 177.061951,
        "kl_cell": 3.260394,
        "aggregate_kl": 3.100834,
        "covariate_ce": 1.10393,
        "treatment_ce": 1.499963,
        "similarity": 0.052967,
        "adversarial": 1.582358,
        "discriminator_accuracy": 0.5,
    },
}


@pytest.mark.parametrize(("likelihood", "architecture"), list(RECORDED))
def test_objective_values_on_a_fixed_batch(adata, likelihood, architecture):
    scvi.settings.seed = 0
    FCRModel.setup_anndata(adata, **SETUP, layer="counts" if likelihood == "nb" else None)
    model = FCRModel(adata, likelihood=likelihood, **ARCHITECTURES[architecture], **TINY)
    module = model.module.eval()
    scvi.settings.seed = 0  # the control partners are drawn from the seeded generator
    loader = FCRDataLoader(model.adata_manager, batch_size=96, shuffle=False, pair_controls=True)
    batch = next(iter(loader))
    torch.manual_seed(123)
    _, _, out = module(batch, loss_kwargs={"kl_weight": 1.0})
    values = {"loss": out.loss.item(), **{k: float(v) for k, v in out.extra_metrics.items()}}
    recorded = RECORDED[likelihood, architecture]
    assert set(values) == set(recorded)
    for key, expected in recorded.items():
        assert values[key] == pytest.approx(expected, rel=1e-4, abs=1e-5), key
