"""Test configuration: make the tests folder importable (shared references) and seed by default."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small real-text byte dataset (tests/run_helpers.py), per test module."""
    from run_helpers import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data"))
