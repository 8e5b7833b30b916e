"""Build: pip install --no-build-isolation .   (-e . for a development install; MAX_JOBS bounds
parallel compile jobs). Metadata: pyproject.toml; this file builds the extension.

Builds kdkernels._C: the C++ CPU kernels (csrc/cpu), and the CUDA kernels (csrc/cuda) when
torch has CUDA and nvcc is found, or when KDKERNELS_FORCE_CUDA=1 (GPU-less build machines;
KDKERNELS_FORCE_CUDA=0 turns them off). CUDA architectures: KDKERNELS_CUDA_ARCHS ("80;90"),
else TORCH_CUDA_ARCH_LIST ("8.0 9.0+PTX"), else the visible GPUs', else 80;90.
The CUDA sources include no torch CUDA header, so they build against any torch."""
import glob
import os
import re
import shutil
import sys
import sysconfig

from setuptools import setup

try:
    import torch
except ImportError as e:  # an isolated build environment (pip without --no-build-isolation)
    raise SystemExit("kdkernels builds its extension against the torch you have installed: "
                     "install torch first, then pip install --no-build-isolation .") from e
import torch.utils.cpp_extension as cpp_ext
from torch.utils.cpp_extension import BuildExtension, CppExtension

CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-psabi",
             "-Wno-maybe-uninitialized"]
# -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers; without the flag it
# compiles to a serial loop (measured: one core busy out of two).


def find_cuda_home():
    """The CUDA toolkit (nvcc and cuda_runtime.h): torch's idea of it, else CUDA_HOME /
    CUDA_PATH, else /usr/local/cuda, else the one above the nvcc on PATH."""
    nvcc = shutil.which("nvcc")
    candidates = (cpp_ext.CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  "/usr/local/cuda", nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) \
                and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def with_cuda():
    force = os.environ.get("KDKERNELS_FORCE_CUDA")
    if force == "0":
        return False
    if force == "1":
        if find_cuda_home() is None:
            raise RuntimeError("KDKERNELS_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    return torch.version.cuda is not None and find_cuda_home() is not None


def cuda_archs():
    """["80", "90+PTX", ...] from KDKERNELS_CUDA_ARCHS, TORCH_CUDA_ARCH_LIST, the GPUs, or 80;90."""
    spec = os.environ.get("KDKERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if spec:
        return [a.replace(".", "") for a in re.split(r"[;\s,]+", spec.strip()) if a]
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return sorted(f"{major}{minor}" for major, minor in caps)
    return ["80", "90"]


def gencode_flags(archs):
    flags = []
    for arch in archs:
        num = arch.replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])
    if with_cuda():
        archs = cuda_archs()
        print(f"kdkernels: building the CUDA kernels for {archs}")
        # One translation unit per mode (divergence_<mode>.cu): they compile side by side.
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/divergence_glue.cpp"]
        cuda_home = find_cuda_home()
        # A CPU-only torch knows no CUDA_HOME; BuildExtension compiles .cu files with the nvcc
        # under this one.
        cpp_ext.CUDA_HOME = cpp_ext.CUDA_HOME or cuda_home
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17"] + gencode_flags(archs)
        # The CUDA headers (cuda_runtime.h, for the glue) through the compiler's CPATH rather
        # than an -I: the CPU sources' compile commands stay those of a CPU-only build, so a
        # build with CUDA reuses that build's object files (ninja compares the commands).
        include = os.path.join(cuda_home, "include")
        os.environ["CPATH"] = os.pathsep.join(filter(None, [include, os.environ.get("CPATH")]))
        kwargs["library_dirs"] = [os.path.join(cuda_home, "lib64")]
        # The CUDA runtime linked statically: no dependency on which libcudart torch ships.
        kwargs["libraries"] = ["cudart_static", "rt", "dl", "pthread"]
    return CppExtension("kdkernels._C", sources, **kwargs)


class BuildExt(BuildExtension):
    """BuildExtension whose object files live in the source tree's build/ even for an editable
    install (setuptools gives that one a throwaway temporary folder): the editable and the
    regular install then share ninja's objects, and the second compiles only what changed.
    An explicit --build-temp is kept."""

    def finalize_options(self):
        super().finalize_options()
        # In a virtual environment setuptools adds its include folder, which changes every
        # compile command and so defeats the sharing: dropped while it holds no file.
        venv_include = os.path.join(sys.exec_prefix, "include")
        if sys.exec_prefix != sys.base_exec_prefix and not any(
                files for _, _, files in os.walk(venv_include)):
            self.include_dirs = [d for d in self.include_dirs if d != venv_include]
        here = os.path.dirname(os.path.abspath(__file__))
        if not os.path.abspath(self.build_temp).startswith(here + os.sep):
            plat = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = os.path.join(here, "build", f"temp.{plat}")


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExt})
