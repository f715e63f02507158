#!/usr/bin/env python3
"""Create and fill the virtual environment at .venv (used by `make test` and `make bench`).

Works on a fresh CPU machine with a package index, and offline on a GPU machine whose `python3` already holds
torch and triton: the venv sees the creating interpreter's packages (through --system-site-packages, plus a .pth
file when that interpreter is itself a venv), and only what is missing or unfit is installed. Wheels under
./.whl (carried to an offline machine) are used when present.

Usage: python3 .ci/bootstrap.py            (creates .venv if needed, then installs what is missing)
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
WHEELS = ROOT / ".whl"

# (distribution, requirement when missing, needed: False means the suite runs without it, skipping what needs it)
# torch==2.13.0 is the CPU build that lies on disk on the development machines; a looser spec would download
# several GB of CUDA packages. triton 3.6.0 is the version on the GPU machines. The Triton interpreter (CI's
# kernel tests) fails on numpy >= 2.4, so numpy is pinned below it where there is no GPU.
REQUIREMENTS = [
    ("torch", "torch==2.13.0", True),
    ("triton", "triton==3.6.0", True),
    ("numpy", "numpy<2.4", True),
    ("pybind11", "pybind11>=2.12", True),
    ("ninja", "ninja", True),
    ("cmake", "cmake>=3.18", True),
    ("setuptools", "setuptools>=64", True),
    ("wheel", "wheel", True),
    ("tqdm", "tqdm", True),
    ("pytest", "pytest", True),
    ("pytest-xdist", "pytest-xdist", False),  # the test tiers on every core; serial without it
    ("rdkit", "rdkit", False),
    ("pytest-benchmark", "pytest-benchmark", False),
    ("scipy", "scipy", False),
    ("networkx", "networkx", True),  # the tests compare with it
    ("matplotlib", "matplotlib", False),
]


def create_venv() -> None:
    if VENV_PYTHON.exists():
        return
    print(f"bootstrap: creating {VENV} from {sys.executable}", flush=True)
    command = [sys.executable, "-m", "venv", "--system-site-packages", str(VENV)]
    if subprocess.run(command).returncode != 0:
        # Some interpreters ship without ensurepip; the parent's pip is reachable through the .pth below.
        subprocess.run(command + ["--without-pip"], check=True)
    if sys.prefix != sys.base_prefix:
        # The creating interpreter is itself a venv (the GPU machines' python3): --system-site-packages
        # reaches only its base, so point at its own site-packages explicitly.
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        site = VENV / "lib" / version / "site-packages"
        paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (site / "_pyblend_parent_site.pth").write_text("".join(p + "\n" for p in sorted(paths)))


def unfit(distribution: str) -> str | None:
    """Why the venv's copy of `distribution` will not do, or None when it will."""
    from importlib import metadata

    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "missing"
    if distribution == "numpy" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 4) and not _has_cuda():
        return f"numpy {version} breaks the Triton interpreter used without a GPU"
    if distribution == "cmake" and not _cmake_ok():
        return "no cmake >= 3.18 on PATH"
    return None


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _cmake_ok() -> bool:
    try:
        out = subprocess.run(["cmake", "--version"], capture_output=True, text=True).stdout.split()
        major, minor = (int(x) for x in out[2].split(".")[:2])
    except (OSError, IndexError, ValueError):
        return False
    return (major, minor) >= (3, 18)


def install_missing() -> int:
    wanted = [(dist, spec, needed, why) for dist, spec, needed in REQUIREMENTS if (why := unfit(dist))]
    if not wanted:
        print("bootstrap: every requirement is present", flush=True)
        return 0
    for dist, spec, _, why in wanted:
        print(f"bootstrap: {dist}: {why} -> installing {spec}", flush=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    if WHEELS.is_dir():
        # Carried wheels first and without the index, so an offline machine never waits on the network; one at
        # a time, since pip installs nothing from a command naming one requirement it cannot find; without
        # their dependencies, which an offline machine cannot fetch either (RDKit's Pillow serves only its
        # drawing code, and the GPU image has it).
        for _, spec, _, _ in wanted:
            subprocess.run(pip + ["--no-index", "--no-deps", "--find-links", str(WHEELS), spec],
                           stderr=subprocess.DEVNULL)
        wanted = [(dist, spec, needed, why) for dist, spec, needed, _ in wanted if (why := unfit(dist))]
    failed = []
    # torch first and alone, so that nothing else can drag in a different torch build.
    for group in ([w for w in wanted if w[0] == "torch"], [w for w in wanted if w[0] != "torch"]):
        if group and subprocess.run(pip + [spec for _, spec, _, _ in group]).returncode != 0:
            # Offline or a broken wheel: retry one by one so that everything installable gets installed.
            for dist, spec, needed, _ in group:
                if subprocess.run(pip + [spec]).returncode != 0:
                    failed.append((dist, needed))
    for dist, needed in failed:
        level = "ERROR" if needed else "warning"
        consequence = "required" if needed else "the benchmarks and tests that need it will be skipped"
        print(f"bootstrap: {level}: could not install {dist} ({consequence}); on an offline machine, carry "
              f"its wheel in .whl/ (see README)", file=sys.stderr, flush=True)
    return 1 if any(needed for _, needed in failed) else 0


def main() -> int:
    if Path(sys.prefix).resolve() != VENV.resolve():
        create_venv()
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    return install_missing()


if __name__ == "__main__":
    sys.exit(main())
