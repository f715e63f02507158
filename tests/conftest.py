"""Test configuration: Triton's interpreter without CUDA, the `gpu` marker, and the quick/full tiers."""
import os
import zlib

import torch

# Must happen before anything imports triton: without a GPU the Triton kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # pytest-xdist runs one worker per core: torch's own threads would oversubscribe them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the full tier (larger sweeps)")
    parser.addoption("--repeat-seeds", type=int, default=1, metavar="N",
                     help="run each test that takes the `generator` fixture N times, each with a fresh seed")


def pytest_generate_tests(metafunc):
    repeats = metafunc.config.getoption("--repeat-seeds")
    if repeats > 1 and "generator" in metafunc.fixturenames:
        metafunc.fixturenames.append("_seed_repeat")
        metafunc.parametrize("_seed_repeat", range(repeats))


def pytest_configure(config):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if interpreting and tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        pytest.exit(f"numpy {np.__version__} breaks Triton's interpreter (loops with run-time bounds); "
                    "use numpy < 2.4, as `make test` does", returncode=4)


def pytest_collection_modifyitems(config, items):
    run_full = config.getoption("--full")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "full" in item.keywords and not run_full:
            item.add_marker(pytest.mark.skip(reason="full tier: run with --full"))


@pytest.fixture(autouse=True)
def _seed_global_generator(request):
    """Seed torch's global generator from the test's id, so a test that draws from it (module initialisation,
    say) sees the same values however pytest-xdist orders the tests across its workers."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def generator():
    """A torch.Generator with a fresh seed per test, printed on failure through the test id's output."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"generator seed: {seed}")
    return torch.Generator().manual_seed(seed)


def _default_batch(count: int, hydrogens: bool):
    pytest.importorskip("rdkit", reason="the default molecule set is RDKit's and featurized with it")
    from pyblend import collate, featurize_many
    from pyblend.chem import default_molecules

    graphs, _ = featurize_many(default_molecules(count), errors="skip", progress=False, hydrogens=hydrogens)
    return graphs, collate(graphs)


@pytest.fixture(scope="session")
def default_batch():
    """The first 300 SMILES of the default set (RDKit's NCI file), heavy atoms: (graphs, padded MolBatch)."""
    return _default_batch(300, hydrogens=False)


@pytest.fixture(scope="session")
def default_batch_with_hydrogens():
    """The first 1000 SMILES of the default set with explicit hydrogens (up to ~130 atoms)."""
    return _default_batch(1000, hydrogens=True)
