"""Package hygiene: what `import pyblend` costs, a missing extension, import direction, the CLI."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path


import pyblend

ROOT = Path(__file__).resolve().parent.parent


def python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)


def test_import_is_light_and_queries_no_device():
    result = python("import sys, pyblend, torch\n"
                    "print(sorted(m for m in ('rdkit', 'triton', 'pyblend._C', 'pyblend.kernels') if m in sys.modules))\n"
                    "print(torch.cuda.is_initialized())")
    assert result.returncode == 0, result.stderr
    loaded, cuda_initialized = result.stdout.split("\n")[:2]
    assert loaded == "[]", f"import pyblend loaded {loaded}"
    assert cuda_initialized == "False"


def test_featurization_imports_no_torch():
    """featurize_many's worker processes import pyblend.chem: that must cost RDKit alone, not torch too (it did,
    and two workers were slower than one on the default set)."""
    result = python("import sys, pyblend.chem\nprint('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_layers_and_models_work_without_rdkit():
    """Only featurization needs RDKit: the layers and MoleBlend (whose embedding sizes come from
    pyblend.features) import and run where it is not installed (as on the offline GPU machines)."""
    result = python("import sys\n"
                    "sys.modules['rdkit'] = None  # any import of RDKit now fails\n"
                    "import pyblend.nn, pyblend.ops\n"
                    "from pyblend.models import MoleBlend, MoleBlendConfig\n"
                    "model = MoleBlend(MoleBlendConfig(layers=1, dim=16, heads=2, ffn_dim=16))\n"
                    "print('pyblend.chem' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_version_and_typing_marker():
    assert re.fullmatch(r"\d+\.\d+\.\d+", pyblend.__version__)
    assert (Path(pyblend.__file__).parent / "py.typed").exists()


def test_every_subpackage_is_an_attribute():
    """``pyblend.models`` and friends load on first use as ``pyblend.ops`` does (they raised AttributeError)."""
    result = python("import pyblend\n"
                    "print(all(hasattr(pyblend, name) for name in pyblend.__all__))\n"
                    "print(pyblend.models.MoleBlend.__name__, pyblend.metrics.__name__, pyblend.features.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "MoleBlend", "pyblend.metrics", "pyblend.features"]


BLOCK_EXTENSION = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "pyblend._C":
            raise ImportError("simulated: extension not built")
sys.meta_path.insert(0, Block())
import torch, pyblend
from pyblend import ops
adjacency = torch.tensor([[[False, True], [True, False]]])
print(ops.shortest_path(adjacency).tolist())
try:
    ops.shortest_path(adjacency, backend="cpp")
except ValueError as error:
    print("refused:", error)
"""


def test_works_without_the_extension():
    result = python(BLOCK_EXTENSION)
    assert result.returncode == 0, result.stderr
    first, refusal = result.stdout.strip().split("\n")
    assert first == "[[[0, 1], [1, 0]]]", "automatic dispatch must fall back to the reference"
    assert "pyblend._C is not built" in refusal and "make build" in refusal


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_imports_point_down():
    for path in (ROOT / "kernels").glob("*.py"):
        assert not any("pyblend" in name or name.startswith(".") and name != "." for name in imported_modules(path)
                       if name.startswith((".", "pyblend"))), f"{path.name} imports from pyblend"
    for path in (ROOT / "pyblend" / "reference").glob("*.py"):
        assert not any("kernels" in name or ".ops" in name or name == "..ops" for name in imported_modules(path)), \
            f"reference/{path.name} must not import kernels or ops"
    for path in (ROOT / "pyblend" / "ops").glob("*.py"):
        assert not any(name.startswith("..nn") for name in imported_modules(path)), f"ops/{path.name} imports nn"


def test_cli_usage():
    result = subprocess.run([sys.executable, "-m", "pyblend"], capture_output=True, text=True)
    assert result.returncode == 2 and "bench" in result.stderr and "featurize" in result.stderr
    asked = subprocess.run([sys.executable, "-m", "pyblend", "--help"], capture_output=True, text=True)
    assert asked.returncode == 0 and "bench" in asked.stdout and "featurize" in asked.stdout
    wrong = subprocess.run([sys.executable, "-m", "pyblend", "bencj"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown command 'bencj'" in wrong.stderr


def test_cli_featurize(tmp_path):
    source = tmp_path / "molecules.smi"
    source.write_text("CCO first\nnot_a_smiles second\nc1ccccc1 third\n")
    result = subprocess.run([sys.executable, "-m", "pyblend", "featurize", str(source), str(tmp_path / "out.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "skipped input 1 (not_a_smiles)" in result.stderr and "2 molecules written" in result.stderr
    import torch

    graphs = torch.load(tmp_path / "out.pt", weights_only=False)
    assert [g.smiles for g in graphs] == ["CCO", "c1ccccc1"]


def test_cli_featurize_reads_suffixes_in_any_case_and_fails_when_nothing_is_written(tmp_path):
    table = tmp_path / "molecules.CSV"
    table.write_text("smiles,label\nCCO,1\nc1ccccc1,0\n")
    result = subprocess.run([sys.executable, "-m", "pyblend", "featurize", str(table), str(tmp_path / "out.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "2 molecules written" in result.stderr, result.stderr
    junk = tmp_path / "junk.smi"
    junk.write_text("not_a_smiles\nC1CC\n")
    failed = subprocess.run([sys.executable, "-m", "pyblend", "featurize", str(junk), str(tmp_path / "none.pt")],
                            capture_output=True, text=True)
    assert failed.returncode == 1 and "0 molecules written" in failed.stderr, failed.stderr
    for arguments, words in (([str(junk), "x.pt", "--workers", "0"], "--workers: expected a positive int, got 0"),
                             ([str(tmp_path / "missing.smi"), "x.pt"], "input: no such file")):
        usage = subprocess.run([sys.executable, "-m", "pyblend", "featurize", *arguments], capture_output=True,
                               text=True)
        assert usage.returncode == 2 and words in usage.stderr and "Traceback" not in usage.stderr, usage.stderr


def test_a_cuda_fallback_to_the_reference_warns_once_with_the_reasons():
    """Without a backend request, CUDA inputs the kernels refuse run on the reference: a large slowdown that must
    not pass unnoticed. CPU fallbacks are the norm there (no CUDA) and only log."""
    import warnings

    import pytest
    import torch

    from pyblend.ops._dispatch import choose_backend

    candidates = {"triton": lambda: ["head width 300 > 128"], "reference": lambda: []}
    with pytest.warns(UserWarning, match=r"probe_op: runs on the reference backend; skipped triton: head width 300"):
        assert choose_backend("probe_op", None, torch.device("cuda"), candidates) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_backend("probe_op", None, torch.device("cuda"), candidates) == "reference"  # once
        assert choose_backend("probe_op", None, torch.device("cpu"), candidates) == "reference"
