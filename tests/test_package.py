"""Package hygiene: what `import pyblend` costs, a missing extension, import direction, the CLI."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    # A UTF-8 byte-order mark, and a CXSMILES extension (a radical) that must reach featurize with its SMILES.
    source.write_bytes("\ufeffCCO first\nnot_a_smiles second\nc1ccccc1 third\nCC |^1:1| ethyl\n".encode())
    result = subprocess.run([sys.executable, "-m", "pyblend", "featurize", str(source), str(tmp_path / "out.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "skipped input 1 (not_a_smiles)" in result.stderr and "3 molecules written" in result.stderr
    import torch

    graphs = torch.load(tmp_path / "out.pt", weights_only=False)
    assert [g.smiles for g in graphs] == ["CCO", "c1ccccc1", "CC |^1:1|"]
    assert graphs[2].atom_features[:, 5].tolist() == [0, 1]  # radical electrons


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
    # Refused before featurizing: the input given as the output was overwritten (exit 0), and a missing folder
    # failed only at the save, after every molecule was featurized.
    for arguments, words in (([str(junk), "x.pt", "--workers", "0"], "--workers: expected a positive int, got 0"),
                             ([str(tmp_path / "missing.smi"), "x.pt"], "input: no such file"),
                             ([str(junk), str(junk)], "is the input file; it would be overwritten"),
                             ([str(junk), str(tmp_path)], "is a folder; expected a file path"),
                             ([str(junk), str(tmp_path / "no" / "x.pt")], "does not exist")):
        usage = subprocess.run([sys.executable, "-m", "pyblend", "featurize", *arguments], capture_output=True,
                               text=True)
        assert usage.returncode == 2 and words in usage.stderr and "Traceback" not in usage.stderr, usage.stderr
    assert junk.read_text() == "not_a_smiles\nC1CC\n"


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


def _kernel_op_call(name: str):
    """``(its kernel backend, call(dual, backend) -> output)`` for the op ``name`` (each op with a Triton or C++
    path), on small inputs drawn afresh in the current default dtype; ``dual`` makes the input it is given the one
    whose derivative is taken (a forward-mode dual, a requires-grad leaf, a shifted copy)."""
    import torch

    from pyblend import ops

    randn = lambda *shape: torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))  # noqa: E731
    pair_types = torch.zeros(1, 3, 3, dtype=torch.long)
    gaussian = [torch.rand(4), torch.rand(4) + 0.5, torch.ones(2, 1), torch.zeros(2, 1)]
    routes = torch.tensor([[[[-1], [0]], [[0], [-1]]]])
    distances = torch.tensor([[[0, 1], [1, 0]]])
    latent_weights = dict(q_weight=randn(8, 4), kv_weight=randn(16, 6), out_weight=randn(4, 8))
    calls = {
        "relation_attention": ("triton", lambda dual, backend: ops.relation_attention(
            dual(randn(1, 3, 2, 8)), randn(1, 3, 2, 8), randn(1, 3, 2, 8), backend=backend)),
        "gaussian_basis_bias": ("triton", lambda dual, backend: ops.gaussian_basis_bias(
            dual(randn(1, 3, 3)), pair_types, *gaussian, randn(4, 4), randn(4), randn(2, 4), randn(2),
            backend=backend)[0]),
        "path_edge_bias": ("triton", lambda dual, backend: ops.path_edge_bias(
            routes, distances, dual(randn(1, 2)), randn(1, 2, 2), backend=backend)),
        "outer_product_logits": ("triton", lambda dual, backend: ops.outer_product_logits(
            dual(randn(1, 3, 2)), randn(1, 3, 2), randn(5, 4), backend=backend)),
        "fourier_cross_attention": ("triton", lambda dual, backend: ops.fourier_cross_attention(
            dual(randn(2, 3, 4)), randn(2, 5, 6), heads=2, backend=backend, **latent_weights)),
        "gated_fusion": ("triton", lambda dual, backend: ops.gated_fusion(
            randn(2, 2, 4), dual(randn(2, 2, 4)), randn(2, 2), backend=backend)[0]),
        "multi_infonce": ("triton", lambda dual, backend: ops.multi_infonce(
            {"a": dual(randn(4, 8)), "b": randn(4, 8)}, [("a", "b")], backend=backend)),
        "pair_distances": ("cpp", lambda dual, backend: ops.pair_distances(dual(randn(1, 3, 3)), backend=backend)),
        "gaussian_basis": ("cpp", lambda dual, backend: ops.gaussian_basis(
            dual(randn(1, 3, 3).abs()), pair_types, *gaussian, backend=backend)),
    }
    return calls[name]


_TRITON_OPS = ["relation_attention", "gaussian_basis_bias", "path_edge_bias", "outer_product_logits",
               "fourier_cross_attention", "gated_fusion", "multi_infonce"]


@pytest.mark.parametrize("name", [*_TRITON_OPS, "pair_distances", "gaussian_basis"])
def test_forward_mode_ad_runs_on_the_reference_only(name):
    """The kernels register a backward alone: under forward-mode AD their outputs would carry a zero tangent,
    silently. A request for them refuses tangents with a named reason; the automatic choice (on CUDA too: see the
    dispatch test below) takes the reference, whose tangent matches a finite difference."""
    import torch
    import torch.autograd.forward_ad as fwAD

    from pyblend._extension import extension_available

    backend, call = _kernel_op_call(name)
    if backend == "cpp" and not extension_available():
        pytest.skip("pyblend._C is not built")
    with fwAD.dual_level():
        with pytest.raises(ValueError, match=f"{name}: backend '{backend}' cannot run these inputs: an input "
                                             "carries a forward-mode AD tangent"):
            call(lambda x: fwAD.make_dual(x, torch.ones_like(x)), backend)
    torch.set_default_dtype(torch.float64)  # a finite difference to compare with
    try:
        _, call = _kernel_op_call(name)
        # Not a uniform direction: that moves no distance (shifting every atom alike), for instance.
        direction = lambda x: torch.linspace(-1, 2, x.numel()).reshape(x.shape)  # noqa: E731
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(call(lambda x: fwAD.make_dual(x, direction(x)), None)).tangent
        step = 1e-6
        difference = (call(lambda x: x + step * direction(x), None)
                      - call(lambda x: x - step * direction(x), None)) / (2 * step)
    finally:
        torch.set_default_dtype(torch.float32)
    if difference.is_complex():
        tangent, difference = torch.view_as_real(tangent), torch.view_as_real(difference)
    assert difference.abs().max() > 0, "a case whose output does not depend on its dual input tests nothing"
    torch.testing.assert_close(tangent, difference, rtol=1e-5, atol=1e-7)


def test_forward_mode_tangents_send_cuda_inputs_to_the_reference():
    import torch
    import torch.autograd.forward_ad as fwAD

    from pyblend.ops._dispatch import choose_backend

    candidates = {"triton": lambda: [], "reference": lambda: []}
    x = torch.randn(3)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones(3))
        with pytest.warns(UserWarning, match="probe_jvp: runs on the reference backend; skipped triton: an input "
                                             "carries a forward-mode AD tangent"):
            assert choose_backend("probe_jvp", None, torch.device("cuda"), candidates, inputs={"a": [dual]}) \
                == "reference"
        assert choose_backend("probe_jvp", None, torch.device("cuda"), candidates, inputs=(x, None)) == "triton"
    assert choose_backend("probe_jvp", None, torch.device("cuda"), candidates, inputs=x) == "triton"


@pytest.mark.parametrize("name", _TRITON_OPS)
def test_the_interpreter_refuses_bfloat16(name):
    """Triton 3.6's interpreter computes bfloat16 wrongly (outputs off by ~1e9, silently): a request for the
    kernels on bfloat16 CPU tensors names that reason; the automatic choice runs the reference."""
    import torch

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the refusal concerns Triton's interpreter (TRITON_INTERPRET=1)")
    torch.set_default_dtype(torch.bfloat16)
    try:
        backend, call = _kernel_op_call(name)
        with pytest.raises(ValueError, match="backend 'triton' cannot run these inputs: Triton's interpreter "
                                             "computes bfloat16 wrongly"):
            call(lambda x: x, backend)
        out = call(lambda x: x, None)
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.isfinite(torch.view_as_real(out) if out.is_complex() else out).all()


@pytest.mark.parametrize("name", _TRITON_OPS)
def test_double_backward_on_triton_names_the_op_and_the_reference(name):
    """A gradient of a gradient through a Triton op (e.g. training on forces) raises naming the op and the way
    out, not PyTorch's advice to register a formula on pyblend's internal backward op."""
    import torch

    backend, call = _kernel_op_call(name)
    leaves = []
    out = call(lambda x: leaves.append(x.clone().requires_grad_()) or leaves[-1], backend)
    out = torch.view_as_real(out) if out.is_complex() else out
    (gradient,) = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{name.split('_logits')[0]}.*: the Triton path has first-order "
                                           "gradients only; .* needs backend='reference'"):
        gradient.square().sum().backward()
