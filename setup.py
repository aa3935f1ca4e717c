"""Build script: compiles the C++ CPU ops (always) and the CUDA ops (when possible).

Environment variables:
  ANYDEPTH_BUILD_CUDA   "1" forces the CUDA extension (the build fails if it cannot be built),
                        "0" disables it; unset = build it when torch has CUDA and nvcc is found.
  ANYDEPTH_BUILD_CPP    "0" skips the C++ extensions entirely (pure-Python install: every op
                        falls back to its eager reference).
  TORCH_CUDA_ARCH_LIST  GPU architectures; default "8.0;9.0" (A100 and H100 class).
  MAX_JOBS              parallel compile jobs for ninja (default: number of cores).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "anydepth_kernels", "_build_info.py")


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    sys.exit(f"setup.py: {name}={os.environ[name]!r}: expected 1, 0 or auto")


def _write_build_info(**info):
    lines = ['"""Written by setup.py at build time: what was compiled and why not."""', ""]
    lines += [f"{k.upper()} = {v!r}" for k, v in info.items()]
    with open(BUILD_INFO, "w") as f:
        f.write("\n".join(lines) + "\n")


def _extensions():
    if _flag("ANYDEPTH_BUILD_CPP") is False:
        _write_build_info(cpu_built=False, cuda_built=False, cuda_arch_list=None,
                          cuda_skip_reason="ANYDEPTH_BUILD_CPP=0")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    include = [os.path.join(ROOT, "csrc")]
    # -fno-math-errno -fno-trapping-math: lets GCC vectorise the epilogue loops (their clamps and
    # divisions); nothing here reads errno or FP exception flags. The C++ standard: torch's default.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    exts = [
        CppExtension(
            "anydepth_kernels._C",
            sources=sorted(glob.glob("csrc/cpu/*.cpp")),
            include_dirs=include,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]

    want_cuda = _flag("ANYDEPTH_BUILD_CUDA")
    reason = None
    if want_cuda is False:
        reason = "disabled by ANYDEPTH_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        reason = "nvcc not found (set CUDA_HOME)"
    if reason is not None and want_cuda:
        sys.exit(f"setup.py: ANYDEPTH_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")

    arch_list = None
    if reason is None:
        arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cuda_include = list(include)
        # ATen/cuda headers pull cusparse.h etc. from the pip-installed CUDA runtime packages.
        site = os.path.dirname(os.path.dirname(torch.__file__))
        cuda_include += [p for p in glob.glob(os.path.join(site, "nvidia", "cu*", "include"))]
        exts.append(
            CUDAExtension(
                "anydepth_kernels._C_cuda",
                sources=sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")),
                include_dirs=cuda_include,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    _write_build_info(cpu_built=True, cuda_built=reason is None, cuda_arch_list=arch_list,
                      cuda_skip_reason=reason)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
