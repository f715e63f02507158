"""Lowering Triton kernels for sm_90 (Hopper) without a GPU: PTX through ``triton.compile``, then ptxas for the
register report. CI catches this way what the interpreter cannot see (types, layouts, spills)."""
import os
import subprocess
import sys
import tempfile

import pytest


def lower(kernel, constants: dict, num_warps: int, pointer_type, scalar_type) -> tuple[str, int]:
    """Compile ``kernel`` for sm_90: returns (PTX, bytes of spill stores ptxas reports).

    ``constants`` are the constexpr arguments; every other argument's Triton type comes from
    ``pointer_type(name)`` (names ending in ``_ptr``) or ``scalar_type(name)``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constants else
                 pointer_type(name) if name.endswith("_ptr") else scalar_type(name) for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]
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
