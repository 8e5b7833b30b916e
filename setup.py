"""Build: pip install --no-build-isolation .   (MAX_JOBS bounds parallel compile jobs)

Builds kdkernels._C, the C++ CPU kernels (csrc/). The CUDA kernels of a later release slot in
here as another extension source set for the same op names."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def cpp_sources():
    found = glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    return sorted(found)


setup(
    name="kdkernels",
    version="0.1.0",
    description="Fused knowledge-distillation loss kernels for PyTorch (Triton, C++ CPU)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kdkernels", "kdkernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark", "numpy"]},
    ext_modules=[
        CppExtension(
            "kdkernels._C",
            cpp_sources(),
            # -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers; without the
            # flag it compiles to a serial loop (measured: one core busy out of two).
            extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp", "-Wno-unknown-pragmas",
                                        "-Wno-psabi"]},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
