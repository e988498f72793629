"""Builds pyserve._C with CMake (see CMakeLists.txt).

Environment knobs: PYSERVE_DEBUG=1 (debug build), PYSERVE_CUDA=1 / PYSERVE_HIP=1 (GPU backends),
PYSERVE_BUILD_DIR (reuse a build tree across installs; default build/cmake), CMAKE_ARGS (extra args).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("PYSERVE_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if os.environ.get("PYSERVE_DEBUG") == "1" else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYSERVE_CUDA={'ON' if os.environ.get('PYSERVE_CUDA') == '1' else 'OFF'}",
            f"-DPYSERVE_HIP={'ON' if os.environ.get('PYSERVE_HIP') == '1' else 'OFF'}",
        ] + shlex.split(os.environ.get("CMAKE_ARGS", ""))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", str(build_dir), "--config", cfg, "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("pyserve._C")], cmdclass={"build_ext": CMakeBuild})
