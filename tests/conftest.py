"""Test configuration: make the tests folder importable (shared references), run Triton's kernels in its
CPU interpreter unless the environment says otherwise, one thread per process under pytest-xdist, the long
files first, and build the shared dataset."""

import os
import sys
from pathlib import Path

# Before any test module is collected: `triton.jit` reads TRITON_INTERPRET when triton is first imported,
# and importing parts of torch (torch._dynamo.testing, inductor) imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist there is a worker per logical CPU: one thread each (and in every process a test starts).
# Two workers of two OpenMP threads each on two cores spin against each other and take longer than one.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small real-text byte dataset (tests/run_helpers.py), per test module."""
    from run_helpers import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def one_hidden_tile(monkeypatch):
    """Depth-2 Triton states walked in one hidden tile, whatever a test's hidden width: the interpreter's
    time grows with the tiles, and the tile only shapes a GPU launch. The hidden-tile and one-launch scan
    tests (test_triton_chunk_step.py) walk several."""
    kernels = pytest.importorskip("titans.kernels.chunk_step_triton")
    monkeypatch.setattr(kernels, "BLOCK_HIDDEN", 1 << 20)


# The files that take minutes, longest first, before the others: under `--dist loadfile` a long file handed
# out last keeps one worker busy while the rest wait.
LONG_FILES = ("test_parallel.py", "test_scaling.py", "test_triton_chunk_step.py", "test_compile.py",
              "test_sequence_gradients.py", "test_convert.py", "test_slurm.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: a file keeps its order
