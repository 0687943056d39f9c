"""Models saved under one scvi-tools version (``tests/data/saved_models``, written by
``tests/saved_models.py``) load under the installed one and give the same outputs."""

import numpy as np
import pytest

from fcr_tools import FCRModel
from saved_models import ROOT, TREATMENT, outputs, screen

SAVED = sorted(path for path in ROOT.glob("scvi-tools-*") if path.is_dir())


def test_there_are_saved_models_of_the_supported_versions():
    versions = {path.name.removeprefix("scvi-tools-") for path in SAVED}
    assert {"1.4.2", "1.5.1"} <= versions


@pytest.mark.parametrize("path", SAVED, ids=[path.name for path in SAVED])
def test_a_saved_model_loads_and_gives_the_same_outputs(path):
    model = FCRModel.load(str(path), adata=screen(), accelerator="cpu")
    assert model.is_trained
    assert model.fcr_version_["model_format"] == "1.2"
    expected = np.load(path / "expected.npz")
    got = outputs(model, screen())
    np.testing.assert_allclose(got["latents"], expected["latents"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        got["counterfactual"], expected["counterfactual"], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("path", SAVED, ids=[path.name for path in SAVED])
def test_a_saved_model_loads_without_data_and_predicts(path):
    model = FCRModel.load(str(path), accelerator="cpu")
    assert model.adata is None
    predicted = model.predict_counterfactual(screen()[:3], treatment=TREATMENT, dose=1.0)
    assert predicted.shape == (3, model.summary_stats.n_vars)
