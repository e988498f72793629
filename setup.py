"""Builds pyserve._C with CMake (see CMakeLists.txt).

`pip install -e .` (the README's commands) builds the extension into the source tree, next to the
Python files, so `python -m pyserve` works from the clone's root too. A second install in the same
clone reuses the CMake build tree (build/cmake) and recompiles only what changed.

Environment knobs: PYSERVE_DEBUG=1 (debug build), PYSERVE_CUDA=1 / PYSERVE_HIP=1 (GPU backends),
PYSERVE_BUILD_DIR (reuse a build tree across installs; default build/cmake), CMAKE_ARGS (extra args).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _stable_pybind11_cmake_dir(build_dir: Path) -> str:
    """pybind11's CMake config, from a copy at a fixed path inside the build tree.

    pip builds every install in a fresh temporary environment. Pointing CMake at pybind11 there
    would change the include flags of every object file on each install, and so recompile the
    whole extension each time (the README's test command after its first command, say). The copy,
    named by version, keeps the flags identical, so an install with unchanged sources recompiles
    nothing."""
    import pybind11

    src = Path(pybind11.__file__).resolve().parent
    dst = build_dir / f"pybind11-{pybind11.__version__}"
    done = dst / ".copied"
    if not done.exists():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))  # keeps mtimes
        done.touch()
    return str(dst / Path(pybind11.get_cmake_dir()).resolve().relative_to(src))


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("PYSERVE_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        pybind11_dir = _stable_pybind11_cmake_dir(build_dir)
        cfg = "Debug" if os.environ.get("PYSERVE_DEBUG") == "1" else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_dir}",
            f"-DPYSERVE_CUDA={'ON' if os.environ.get('PYSERVE_CUDA') == '1' else 'OFF'}",
            f"-DPYSERVE_HIP={'ON' if os.environ.get('PYSERVE_HIP') == '1' else 'OFF'}",
        ] + shlex.split(os.environ.get("CMAKE_ARGS", ""))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", str(build_dir), "--config", cfg, "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("pyserve._C")], cmdclass={"build_ext": CMakeBuild})
