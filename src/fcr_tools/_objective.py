"""The weighted terms of the FCR objective, defined once.

Each term of :meth:`FCRModule.loss <fcr_tools.FCRModule.loss>` that has a weight in
``plan_kwargs`` is a field of :class:`LossWeights`: its weight argument, default, doc line and
the metrics it logs. The rest is derived from that definition: the weight arguments of
:class:`~fcr_tools.FCRTrainingPlan` and of ``FCRModule.loss`` (their checks, signatures and
docstring entries), the default panels of :func:`fcr_tools.pl.history` and the tests' tables.

Adding a term takes a field of :class:`LossWeights`, its maths in ``FCRModule.loss`` (read
its weight from the :class:`LossWeights` there), its rows in ``docs/method.md`` (the
objective's table, and the logged metrics) and its test; as the objective changes, the
values recorded in ``tests/test_objective_values.py`` are re-recorded on purpose.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import textwrap
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import numpy as np


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


def _term(doc: str, *metrics: str, default: float = 1.0):
    """A field of :class:`LossWeights`: the term's default weight, doc line and metrics."""
    return field(default=default, metadata={"doc": doc, "metrics": metrics})


@dataclass(frozen=True, kw_only=True)
class LossWeights:
    """The weight of each term of the FCR objective, checked.

    Each field is a weight argument of :class:`~fcr_tools.FCRTrainingPlan` (so of
    ``model.train(plan_kwargs=...)``) and of :meth:`~fcr_tools.FCRModule.loss`, with its
    default and doc line (field metadata ``"doc"``) and the term's metrics (metadata
    ``"metrics"``): its unweighted values that the loss logs (``extra_metrics``, and
    ``<metric>_train`` / ``<metric>_validation`` in ``model.history``), first the value that
    the weight multiplies. A term with weight 0 is not computed and logs none of them. The
    reconstruction and control-partner terms have none here: the cells' terms are logged
    whatever the weights (``nll_cell``, ``kl_cell`` and scvi-tools' ``reconstruction_loss``,
    ``kl_local``, ``elbo``), the partners' under the ``*_partner`` names (see
    ``FCRLossOutput``). The KL terms' weight is not a field: it is the plan's
    ``max_kl_weight`` with its warm-up, passed to the loss as ``kl_weight``.

    Every weight must be a finite real number >= 0 (numpy scalars too, not a bool; a
    ``ValueError`` names the weight otherwise) and is stored as a float. Only keyword
    arguments; an unknown name is a ``TypeError``.
    """

    reconstruction_weight: float = _term("Weight of the reconstruction negative log-likelihood.")
    control_weight: float = _term(
        "Weight of the control partner's reconstruction and KL, relative to the cell's."
    )
    aggregate_kl_weight: float = _term(
        "Weight of the per-condition (moment-matched) KL.", "aggregate_kl"
    )
    covariate_classifier_weight: float = _term(
        "Weight of the covariate classifiers on z_x.", "covariate_ce"
    )
    treatment_classifier_weight: float = _term(
        "Weight of the treatment classifier on (z_t, z_tx).", "treatment_ce"
    )
    similarity_weight: float = _term(
        "Weight of the similarity term cos(z_t, z_t0) - cos(z_x, z_x0).", "similarity"
    )
    x_invariance_weight: float = _term(
        "Weight of the invariance of z_x to treatment: the share of the treated cells' z_x "
        "differences from their control partners that their condition explains.",
        "x_invariance",
        default=0.3,
    )
    t_invariance_weight: float = _term(
        "Weight of the invariance of z_t to the covariates: the share of the spread of z_t "
        "around its condition's mean, compared within each (treatment, dose), that the "
        "covariates explain.",
        "t_invariance",
        default=3.0,
    )
    adversarial_weight: float = _term(
        "Weight of the encoder's loss against the permutation discriminators.",
        "adversarial",
        "discriminator_accuracy",
    )

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _checked_weight(f.name, getattr(self, f.name)))

    @classmethod
    def pop_from(cls, kwargs: dict) -> LossWeights:
        """The weights among ``kwargs``, removed from it; defaults for those not there."""
        return cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})

    def as_kwargs(self) -> dict[str, float]:
        """``{weight argument: value}`` for every term."""
        return asdict(self)


class LossTerm(NamedTuple):
    """One weighted term of the objective, as a field of :class:`LossWeights` defines it."""

    weight: str
    default: float
    doc: str
    metrics: tuple[str, ...]


def loss_terms(weights: type[LossWeights] = LossWeights) -> tuple[LossTerm, ...]:
    """The terms defined by the fields of ``weights``, in their order."""
    return tuple(
        LossTerm(f.name, f.default, f.metadata["doc"], f.metadata["metrics"])
        for f in fields(weights)
    )


#: the weighted terms of the objective, in the order of :class:`LossWeights`
LOSS_TERMS = loss_terms()

_MARKER = re.compile(r"^( *)\{loss weights\}\n", re.MULTILINE)


def _entries(terms: tuple[LossTerm, ...], indent: str) -> str:
    """The numpydoc parameter entries of ``terms``, indented by ``indent``."""
    wrap = textwrap.TextWrapper(
        96, initial_indent=indent + "    ", subsequent_indent=indent + "    "
    )
    return "".join(f"{indent}{t.weight}\n{wrap.fill(_described(t))}\n" for t in terms)


def _described(term: LossTerm) -> str:
    """The term's doc line and the metrics it logs."""
    if not term.metrics:
        return term.doc
    return f"{term.doc} Logged metrics: {', '.join(f'``{m}``' for m in term.metrics)}."


def _name_weights(obj, terms: tuple[LossTerm, ...]):
    """:func:`with_loss_weights` for the given terms."""
    func = vars(obj).get("__init__") if isinstance(obj, type) else obj
    if func is None:
        raise TypeError(f"{obj.__qualname__} does not define __init__.")
    signature = inspect.signature(func)
    *params, last = signature.parameters.values()
    if last.kind is not inspect.Parameter.VAR_KEYWORD:
        raise TypeError(f"{func.__qualname__} takes no **keyword arguments for the weights.")
    keyword = inspect.Parameter.KEYWORD_ONLY  # annotations as strings, as in this package
    weights = [
        inspect.Parameter(t.weight, keyword, default=t.default, annotation="float") for t in terms
    ]
    rest = [] if last.name == "weights" else [last]
    func.__signature__ = signature.replace(parameters=[*params, *weights, *rest])
    func.__annotations__ = {**func.__annotations__, **{t.weight: "float" for t in terms}}
    if obj.__doc__ is not None:  # None under python -OO
        doc, n = _MARKER.subn(lambda match: _entries(terms, match.group(1)), obj.__doc__)
        if n != 1:
            raise ValueError(
                f"The docstring of {obj.__qualname__} has no '{{loss weights}}' line."
            )
        obj.__doc__ = doc
    return obj


def with_loss_weights(obj):
    """Decorator: name every loss weight in the signature and docstring of ``obj``.

    ``obj`` (a function, or a class by its ``__init__``) takes the weights as keyword
    arguments through its ``**`` parameter. Its signature (what ``help``, Jupyter and Sphinx
    show) lists them instead, keyword-only, with their defaults: a ``**weights`` parameter is
    replaced, another one (``**kwargs``) stays after them. The line ``{loss weights}`` of its
    docstring becomes their numpydoc parameter entries: each term's doc line and the metrics
    it logs.

    Parameters
    ----------
    obj
        The function or class.

    Returns
    -------
    ``obj``, its signature and docstring completed.
    """
    return _name_weights(obj, LOSS_TERMS)
