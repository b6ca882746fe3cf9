"""Build driver: setuptools hands the extension to CMake + ninja (see CMakeLists.txt).

Environment switches:
  CM3RT_CPU_ONLY=1        skip the CUDA kernels even if nvcc is found
  CM3RT_CUDA_ARCHS="80;90a"  CUDA architectures (default 80;90a)
  CM3RT_PORTABLE=1        no -march=native (a binary that runs on any x86-64 / arm64 CPU)
  CM3RT_BUILD_TYPE=Release|RelWithDebInfo|Debug
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: all cores)
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _flag(name: str) -> str:
    return "ON" if os.environ.get(name, "0") not in ("", "0", "false", "False", "OFF") else "OFF"


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CM3RT_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCM3RT_OUTPUT_DIR={out_dir}",
            f"-DCM3RT_CPU_ONLY={_flag('CM3RT_CPU_ONLY')}",
            f"-DCM3RT_PORTABLE={_flag('CM3RT_PORTABLE')}",
            f"-DCM3RT_CUDA_ARCHS={os.environ.get('CM3RT_CUDA_ARCHS', '80;90a')}",
        ]
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(config, check=True, env=env)
        subprocess.run(["cmake", "--build", str(build_dir)], check=True, env=env)


setup(ext_modules=[CMakeExtension("cm3rt._C")], cmdclass={"build_ext": CMakeBuild})
