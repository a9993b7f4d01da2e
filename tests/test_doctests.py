"""Every docstring example in the package runs and says what it shows."""
import doctest
import importlib
import pkgutil

import pytest

import autoperm

MODULES = sorted(m.name for m in pkgutil.walk_packages(autoperm.__path__, "autoperm.") if ".plugins." not in m.name)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} failing example(s) in {name}"
