"""Build metadd_fast: Python package, Triton kernels (metadd_fast.kernels) and the C++ CPU extension."""
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(os.path.join("csrc", f) for f in os.listdir(os.path.join(HERE, "csrc")) if f.endswith(".cpp"))

setup(
    name="metadd_fast",
    version="0.1.0",
    description="Fused GPU (Triton) and CPU (C++) kernels for dataset distillation: MetaDD CAM variance, CVaR",
    packages=["metadd_fast", "metadd_fast.ops", "metadd_fast.kernels"],
    package_dir={"metadd_fast": "metadd_fast", "metadd_fast.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.3", "numpy", "tqdm"],
    extras_require={"triton": ["triton>=3.0"], "demo": ["scikit-learn", "matplotlib", "pillow"]},
    entry_points={"console_scripts": ["metadd-fast=metadd_fast.cli:main"]},
    ext_modules=[
        CppExtension(
            "metadd_fast._C",
            SOURCES,
            # -fopenmp: at::parallel_for's OpenMP loop is in a header, compiled here.
            extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
