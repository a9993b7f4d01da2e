"""Model-zoo suite: which models, the per-model cache, known failures, ordering and xdist grouping.

Options (or environment variables):

- ``--zoo=default|all|torchvision`` (``AUTOPERM_ZOO``): the smallest config of every timm family
  (default), every timm config, or torchvision's classification models;
- ``AUTOPERM_ZOO_TIMEOUT``: seconds per test (default 600);
- ``AUTOPERM_ZOO_SLOW=1``: also run the checks ``known_failures.SLOW`` skips for CI's time budget;
- ``AUTOPERM_ZOO_MEMORY_GB``: models whose parameters alone need more are skipped (default 24);
- ``AUTOPERM_UPDATE_SNAPSHOTS=1``: rewrite the spec snapshots instead of comparing.

Every test of one model carries ``xdist_group(model)``; under ``-n N`` the suite switches xdist to
``loadgroup`` so one worker runs all of a model's tests and builds the model and its spec once.
"""
import os

import pytest

from autoperm.zoo import zoo_entries
from autoperm.zoo._runner import BYTES_PER_PARAM
from autoperm.zoo._registry import timm_params

from known_failures import KNOWN_FAILURES, SLOW

KINDS = ["trace", "snapshot", "invariance", "planted_weight", "planted_activation"]
TIMEOUT = float(os.environ.get("AUTOPERM_ZOO_TIMEOUT", 600))
MEMORY_GB = float(os.environ.get("AUTOPERM_ZOO_MEMORY_GB", 24))


def pytest_addoption(parser):
    parser.addoption("--zoo", default=os.environ.get("AUTOPERM_ZOO", "default"),
                     choices=["default", "all", "torchvision"], help="which models the zoo tests cover")


def pytest_configure(config):
    config.addinivalue_line("markers", "zoo_kind(kind): which check a zoo test runs (see KINDS)")
    # All tests of one model on one worker (they share the cached model and spec): loadgroup
    # scheduling, both on the controller and, through ``loadgroup``, in each worker's collection.
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


_ENTRIES = {}


def entries(config):
    zoo = config.getoption("--zoo")
    if zoo not in _ENTRIES:
        _ENTRIES[zoo] = zoo_entries(zoo)
    return _ENTRIES[zoo]


def _size_skip(name):
    if ":" in name:
        return None
    need = timm_params([name])[name] * BYTES_PER_PARAM / 2 ** 30
    return pytest.mark.skip(reason=f"needs about {need:.0f} GB, over {MEMORY_GB:g} GB") if need > MEMORY_GB else None


def pytest_generate_tests(metafunc):
    """Parametrize ``entry`` over the zoo; each case marked with its kind's known failure, group and timeout."""
    if "entry" not in metafunc.fixturenames:
        return
    kind = metafunc.definition.get_closest_marker("zoo_kind").args[0]
    known = {p.values: p.marks for p in KNOWN_FAILURES + SLOW}
    cases = []
    for e in entries(metafunc.config):
        marks = [pytest.mark.xdist_group(e.name), pytest.mark.timeout(TIMEOUT), *known.get((e.name, kind), ())]
        skip = _size_skip(e.name)
        cases.append(pytest.param(e, marks=marks + ([skip] if skip else []), id=e.name))
    metafunc.parametrize("entry", cases)


def pytest_collection_modifyitems(config, items):
    """Run each model's tests back to back (trace first), so the cached model and spec are reused."""
    order = {e.name: i for i, e in enumerate(entries(config))}

    def key(item):
        cs = getattr(item, "callspec", None)
        mark = item.get_closest_marker("zoo_kind")
        if cs is None or "entry" not in cs.params or mark is None:
            return (-1, 0)
        return (order.get(cs.params["entry"].name, len(order)), KINDS.index(mark.args[0]))

    zoo = [i for i, it in enumerate(items) if key(it)[0] >= 0]
    for slot, item in zip(zoo, sorted((items[i] for i in zoo), key=key)):
        items[slot] = item
        if hasattr(config, "workerinput") and "@" not in item.nodeid:  # what loadgroup's workers do
            item._nodeid = f"{item.nodeid}@{item.get_closest_marker('xdist_group').args[0]}"
