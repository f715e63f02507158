"""Build pyblend: the Python packages plus the optional C++ CPU engine ``pyblend._C`` (CMake + ninja).

Environment switches:
    PYBLEND_NO_EXTENSION=1   skip the C++ build (``import pyblend`` still works; C++ ops raise when called)
    PYBLEND_BUILD_JOBS=N     cap parallel compile jobs (default: CPU count, at most 8)
    PYBLEND_BUILD_TYPE=Debug build the extension without optimisation (default Release: -O3)
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        # setuptools decides where the module must land (build dir, or the source tree for editable installs).
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("PYBLEND_BUILD_JOBS", str(min(os.cpu_count() or 1, 8)))
        configure = [
            "cmake", str(ext.source_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('PYBLEND_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYBLEND_OUTPUT_DIR={output.parent}",
            f"-DPYBLEND_OUTPUT_NAME={output.name}",
        ]
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


ext_modules = []
if os.environ.get("PYBLEND_NO_EXTENSION", "0") != "1":
    ext_modules.append(CMakeExtension("pyblend._C", ROOT))

setup(
    # Every subpackage of pyblend/ (found, so a new one cannot be left out of the wheel), plus the two below.
    packages=["pyblend", *(f"pyblend.{name}" for name in find_packages(str(ROOT / "pyblend"))),
              "pyblend.kernels", "pyblend.benchmarks"],
    # kernels/ and benchmarks/ live at the top of the repository but ship inside the package.
    package_dir={"pyblend.kernels": "kernels", "pyblend.benchmarks": "benchmarks"},
    package_data={"pyblend": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
