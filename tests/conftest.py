"""Tests that read a real dataset carry ``@pytest.mark.dataset("ml-100k-mm", ...)``.

Without the dataset under the data root (data/README.md) such a test is skipped with a reason naming
what is missing and where to get it (``pytest -rs``, on by default, lists one line per test). With
``M3BSR_REQUIRE_DATA=1`` (CI, ``.ci/run``) it fails instead, so a data root gone missing cannot pass
as a row of skips.
"""
import os

import pytest
import torch

from m3bsr.data.sources import dataset_missing


def pytest_configure(config):
    config.addinivalue_line("markers", "dataset(*names): the test reads these real datasets (skips without them, "
                                       "fails without them under M3BSR_REQUIRE_DATA=1)")


def missing(item: pytest.Item) -> str | None:
    """Why ``item`` cannot run (the first missing dataset's :func:`dataset_missing` message, naming the
    others missing), or None."""
    names = [n for mark in item.iter_markers("dataset") for n in mark.args]
    gone = [(n, m) for n, m in zip(names, map(dataset_missing, names)) if m]
    if not gone:
        return None
    return gone[0][1] + (f" (also missing: {', '.join(n for n, _ in gone[1:])})" if len(gone) > 1 else "")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("M3BSR_REQUIRE_DATA") == "1":
        return
    for item in items:
        why = missing(item)
        if why:
            item.add_marker(pytest.mark.skip(reason=why))  # reported at the test's own line


def pytest_runtest_setup(item):
    why = missing(item) if os.environ.get("M3BSR_REQUIRE_DATA") == "1" else None
    if why:
        pytest.fail(f"M3BSR_REQUIRE_DATA=1: {why}", pytrace=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation cost (and stall on a busy machine).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
