"""fcr_tools: Factorized Causal Representations of single-cell perturbation responses."""

from importlib.metadata import PackageNotFoundError, version

from . import baselines, data, metrics, pl, pp, tl
from ._model import FCRModel
from ._module import FCRModule
from ._training_plan import FCRTrainingPlan

try:
    __version__ = version("fcr-tools")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "FCRModel",
    "FCRModule",
    "FCRTrainingPlan",
    "__version__",
    "baselines",
    "data",
    "metrics",
    "pl",
    "pp",
    "tl",
]
