"""The public API: every subpackage declares ``__all__``, and docs/api.md lists all of it."""

import inspect
import re
from pathlib import Path

import pytest

import fcr_tools

API_PAGE = Path(__file__).parents[1] / "docs" / "api.md"
SUBPACKAGES = ["baselines", "data", "metrics", "pl", "pp", "tl"]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_declares_its_public_names(name):
    module = getattr(fcr_tools, name)
    assert hasattr(module, "__all__"), f"fcr_tools.{name} has no __all__"
    # the functions and classes defined in the module itself, not imported ones
    defined = {
        key
        for key, value in vars(module).items()
        if not key.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__.startswith(f"fcr_tools.{name}")
    }
    assert defined <= set(module.__all__), defined - set(module.__all__)
    for key in module.__all__:
        assert hasattr(module, key), key


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_api_page_lists_every_exported_name(name):
    listed = set(re.findall(rf"^\s+{name}\.(\w+)\s*$", API_PAGE.read_text(), re.MULTILINE))
    module = getattr(fcr_tools, name)
    assert set(module.__all__) == listed, set(module.__all__) ^ listed
