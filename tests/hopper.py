"""Lowering Triton kernels for sm_90 (Hopper) without a GPU: PTX through ``triton.compile``, then ptxas for the
register report. CI catches this way what the interpreter cannot see (types, layouts, spills)."""
import os
import subprocess
import sys
import tempfile

import pytest


# The most shared memory one block may take on an H100 / H200 (227 KiB, opted in above the 48 KiB default).
HOPPER_SHARED_MEMORY_BYTES = 232448


def lower(kernel, constants: dict, num_warps: int, pointer_type, scalar_type) -> tuple[str, int]:
    """Compile ``kernel`` for sm_90: returns (PTX, bytes of spill stores ptxas reports).

    Raises when the kernel needs more shared memory than one Hopper block can have: such a launch fails only on
    the GPU ("out of resource: shared memory"), never under the interpreter.

    ``constants`` are the constexpr arguments; every other argument's Triton type comes from
    ``pointer_type(name)`` (names ending in ``_ptr``) or ``scalar_type(name)``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constants else
                 pointer_type(name) if name.endswith("_ptr") else scalar_type(name) for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    shared = compiled.metadata.shared
    if os.environ.get("PYBLEND_SHARED_REPORT"):  # a file to append each kernel's shared memory to
        with open(os.environ["PYBLEND_SHARED_REPORT"], "a") as report:
            report.write(f"{shared}\t{kernel.fn.__name__}\t{num_warps}\t{constants}\n")
    if shared > HOPPER_SHARED_MEMORY_BYTES:
        raise AssertionError(f"{kernel.fn.__name__} with {constants}, {num_warps} warps needs {shared} bytes of "
                             f"shared memory; an sm_90 block has at most {HOPPER_SHARED_MEMORY_BYTES}")
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as handle:
        handle.write(ptx)
        handle.flush()
        verbose = subprocess.run([ptxas, "-v", "-arch=sm_90a", handle.name, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
    spills = sum(int(part.split()[0]) for line in verbose.splitlines() if "spill stores" in line
                 for part in line.split(",") if "spill stores" in part)
    return ptx, spills


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
