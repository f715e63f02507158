"""Lowering Triton kernels for sm_90 (Hopper) without a GPU: the launchers run on CPU tensors with their launches
recorded, each launch compiles through ``triton.compile`` as on the GPU, then ptxas reports spills and cuobjdump
gives the SASS. CI catches this way what the interpreter cannot see (types, layouts, spills, vector widths)."""
import contextlib
import os
import subprocess
import sys
import tempfile

import pytest


# The most shared memory one block may take on an H100 / H200 (227 KiB, opted in above the 48 KiB default).
HOPPER_SHARED_MEMORY_BYTES = 232448


@contextlib.contextmanager
def captured_launches(grids: list | None = None):
    """Record every Triton launch as ``(kernel, args, kwargs)`` instead of running it, so a launcher can be
    called on CPU tensors to see what it would compile on a GPU. ``grids``: a list to which each launch's
    ``(kernel name, grid)`` is appended (a callable grid resolved as Triton would)."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append((kernel, args, kwargs))
        if grids is not None:
            grid = grid(dict(zip(kernel.arg_names, args), **kwargs)) if callable(grid) else grid
            grids.append((kernel.fn.__name__, tuple(grid)))

    run = JITFunction.run
    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run


def case_dtype(name: str):
    """The torch dtype a compile case names ("bfloat16", "float32", ...), where "tf32" means float32 with TF32
    allowed (whose dots run on the tensor cores); sets torch's TF32 switch to match."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
    return torch.float32 if name == "tf32" else getattr(torch, name)


def lower_launch(kernel, args: tuple, kwargs: dict) -> tuple[str, int, str]:
    """Compile one captured launch for sm_90 as Triton's JIT would on a GPU: an integer equal to 1 becomes a
    constant, and integers divisible by 16 and 16-byte aligned pointers are marked so, as at run time (what
    decides whether loads are vector-wide). Returns (PTX, bytes of spill stores, SASS)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends import BaseBackend

    options = {name: kwargs[name] for name in ("num_warps", "num_stages") if name in kwargs}
    values = dict(zip(kernel.arg_names, args), **{k: v for k, v in kwargs.items() if k not in options})
    signature, constants, attrs = {}, {}, {}
    for position, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", values[name]
            continue
        kind, hint = native_specialize_impl(BaseBackend, values[name], False, True, True)
        if kind == "constexpr":
            signature[name], constants[name] = "constexpr", hint
            continue
        signature[name] = kind
        if hint == "D":
            attrs[(position,)] = [["tt.divisibility", 16]]
    compiled = _compile(kernel, signature, constants, attrs, options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", handle.name], capture_output=True, text=True,
                              check=True).stdout
    return compiled.asm["ptx"], _spills(compiled.asm["ptx"]), sass


def _compile(kernel, signature: dict, constants: dict, attrs: dict, options: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    shared = compiled.metadata.shared
    if os.environ.get("PYBLEND_SHARED_REPORT"):  # a file to append each kernel's shared memory to
        with open(os.environ["PYBLEND_SHARED_REPORT"], "a") as report:
            report.write(f"{shared}\t{kernel.fn.__name__}\t{options}\t{constants}\n")
    if shared > HOPPER_SHARED_MEMORY_BYTES:
        raise AssertionError(f"{kernel.fn.__name__} with {constants}, {options} needs {shared} bytes of "
                             f"shared memory; an sm_90 block has at most {HOPPER_SHARED_MEMORY_BYTES}")
    return compiled


def _tool(name: str) -> str:
    """A CUDA binary tool Triton ships (ptxas, cuobjdump)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _spills(ptx: str) -> int:
    """Bytes of spill stores ptxas reports for ``ptx``."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as handle:
        handle.write(ptx)
        handle.flush()
        verbose = subprocess.run([_tool("ptxas"), "-v", "-arch=sm_90a", handle.name, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
    return sum(int(part.split()[0]) for line in verbose.splitlines() if "spill stores" in line
               for part in line.split(",") if "spill stores" in part)


def run_compile_script(script: str) -> list[str]:
    """Run ``script`` (which may ``import hopper``) in a subprocess without TRITON_INTERPRET, which forbids
    compiling; return its stdout lines. Skips where Triton's NVIDIA backend or its ptxas cannot run."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if "ptxas" in result.stderr and result.returncode:
        pytest.skip(f"Triton cannot run ptxas here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()
