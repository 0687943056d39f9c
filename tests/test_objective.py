"""The weighted terms of the objective: one definition, from which the rest is derived."""

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fcr_tools import FCRModule, FCRTrainingPlan
from fcr_tools import _training_plan as training_plan
from fcr_tools._objective import (
    LOSS_TERMS,
    LossTerm,
    LossWeights,
    _name_weights,
    _term,
    loss_terms,
)
from fcr_tools.pl._history import DEFAULT_TERMS

METHOD_PAGE = Path(__file__).parents[1] / "docs" / "method.md"
WEIGHT_NAMES = [t.weight for t in LOSS_TERMS]


@pytest.fixture(scope="module")
def module():
    return FCRModule(
        n_input=10,
        n_cats_per_cov=[2],
        n_treatment_components=3,
        n_treatment_categories=4,
        control_code=0,
    )


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_terms_are_the_fields_of_loss_weights():
    assert WEIGHT_NAMES == [
        "reconstruction_weight",
        "control_weight",
        "aggregate_kl_weight",
        "covariate_classifier_weight",
        "treatment_classifier_weight",
        "similarity_weight",
        "x_invariance_weight",
        "t_invariance_weight",
        "adversarial_weight",
    ]
    assert LossWeights().as_kwargs() == {t.weight: t.default for t in LOSS_TERMS}
    assert all(t.doc.startswith("Weight of ") for t in LOSS_TERMS)
    # every weight 1 but the invariances of z_x (0.3) and z_t (3), chosen on the benchmarks
    assert {t.weight: t.default for t in LOSS_TERMS if t.default != 1.0} == {
        "x_invariance_weight": 0.3,
        "t_invariance_weight": 3.0,
    }


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_every_weight_is_checked(name):
    weights = LossWeights(**{name: np.float32(0.5)})
    assert getattr(weights, name) == 0.5 and type(getattr(weights, name)) is float
    for bad in (True, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match=rf"^{name} must be a finite real number >= 0"):
            LossWeights(**{name: bad})


def test_unknown_weights_are_type_errors(module):
    with pytest.raises(TypeError, match="adversarial_weigth"):
        LossWeights(adversarial_weigth=0.5)
    with pytest.raises(TypeError):
        LossWeights(1.0)  # keywords only
    # the module checks its weights before it reads the minibatch
    with pytest.raises(TypeError, match="adversarial_weigth"):
        module.loss({}, {}, {}, adversarial_weigth=0.5)
    with pytest.raises(ValueError, match="similarity_weight must be"):
        module.loss({}, {}, {}, similarity_weight=-1.0)


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_the_plan_checks_every_weight_and_passes_it_to_the_loss(module, name):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite real number >= 0"):
        FCRTrainingPlan(module, **{name: -0.5})
    plan = FCRTrainingPlan(module, **{name: np.float64(2.5)})
    expected = LossWeights().as_kwargs() | {name: 2.5}
    assert {key: plan.loss_kwargs[key] for key in expected} == expected
    assert type(plan.loss_kwargs[name]) is float


def test_signatures_name_every_weight_with_its_default():
    plan = inspect.signature(FCRTrainingPlan).parameters
    loss = inspect.signature(FCRModule.loss).parameters
    for term in LOSS_TERMS:
        for params in (plan, loss):
            param = params[term.weight]
            assert param.kind is inspect.Parameter.KEYWORD_ONLY
            assert param.default == term.default
    # the plan's other scvi-tools arguments come after the weights; the loss takes no others
    assert list(plan)[-1] == "kwargs"
    assert list(loss)[-len(LOSS_TERMS) :] == WEIGHT_NAMES
    assert "kl_weight" in loss  # what scvi-tools' plan looks for to pass its warm-up weight


@pytest.mark.parametrize("doc", [FCRTrainingPlan.__doc__, FCRModule.loss.__doc__])
def test_docstrings_document_every_weight(doc):
    assert "{loss weights}" not in doc
    for term in LOSS_TERMS:
        assert _flat(f"{term.weight} {term.doc}") in _flat(doc), term.weight


def test_every_term_and_metric_is_documented_and_plotted():
    page = METHOD_PAGE.read_text()
    plan_doc = _flat(FCRTrainingPlan.__doc__)
    for term in LOSS_TERMS:
        assert f"`{term.weight}`" in page, term.weight  # the objective's table
        for metric in term.metrics:
            assert f"`{metric}`" in page, metric  # the table of logged metrics
            assert metric in DEFAULT_TERMS, metric  # pl.history's default panels
        # the plan's docstring names each weight's metrics with it
        described = _flat(f"{term.weight} {term.doc}")
        if term.metrics:
            described += " Logged metrics: " + ", ".join(f"``{m}``" for m in term.metrics)
        assert described in plan_doc, term.weight


def test_a_new_term_needs_only_its_definition(module, monkeypatch):
    """One more field of LossWeights, and the rest follows.

    Shown on a subclass with a hypothetical term: its checks, the plan's arguments, the
    signature and the docstring entries come from the field alone. (pl.history's panels and
    the tests' tables are derived from ``LOSS_TERMS`` in the same way, at import; the term's
    maths, its test and the recorded objective values are the edits that remain.)
    """

    @dataclass(frozen=True, kw_only=True)
    class WithEntropy(LossWeights):
        entropy_weight: float = _term("Weight of a hypothetical entropy term.", "entropy")

    terms = loss_terms(WithEntropy)
    assert terms[:-1] == LOSS_TERMS
    assert terms[-1] == LossTerm(
        "entropy_weight", 1.0, "Weight of a hypothetical entropy term.", ("entropy",)
    )
    with pytest.raises(ValueError, match="entropy_weight must be a finite real number >= 0"):
        WithEntropy(entropy_weight=True)

    monkeypatch.setattr(training_plan, "LossWeights", WithEntropy)
    plan = FCRTrainingPlan(module, entropy_weight=np.float32(0.25))
    assert plan.loss_kwargs["entropy_weight"] == 0.25
    assert FCRTrainingPlan(module).loss_kwargs["entropy_weight"] == 1.0
    with pytest.raises(ValueError, match="entropy_weight must be"):
        FCRTrainingPlan(module, entropy_weight=-1)

    def loss(x, kl_weight=1.0, **weights):
        """A loss.

        Parameters
        ----------
        x
            The input.
        {loss weights}
        """

    _name_weights(loss, terms)
    assert list(inspect.signature(loss).parameters) == [
        "x",
        "kl_weight",
        *(t.weight for t in terms),
    ]
    doc = inspect.cleandoc(loss.__doc__)
    assert doc.endswith(
        "\nentropy_weight\n    Weight of a hypothetical entropy term. Logged metrics: ``entropy``."
    )


def test_weights_are_named_only_where_the_docstring_says_so():
    def no_marker(**weights):
        """No parameters."""

    def no_var_keyword(x):
        """{loss weights}"""

    with pytest.raises(ValueError, match=r"no '\{loss weights\}' line"):
        _name_weights(no_marker, LOSS_TERMS)
    with pytest.raises(TypeError, match=r"no \*\*keyword arguments"):
        _name_weights(no_var_keyword, LOSS_TERMS)
