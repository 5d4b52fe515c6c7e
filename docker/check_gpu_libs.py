"""Build-time check for docker/Dockerfile.gpu: can onnxruntime-gpu's CUDA provider load here?

onnxruntime-gpu silently falls back to the CPU provider when a CUDA or cuDNN library it needs
is missing or has the wrong major version. In an image that mistake would only show at run time
as slow inference, so the GPU image runs this script after `pip install .` and fails the build.

Checks, each reported with what was found and what was expected:
1. the base image's CUDA major (nvidia/cuda sets CUDA_VERSION) equals the one the installed
   onnxruntime-gpu wheel was built for;
2. every shared library the CUDA provider links against resolves (`ldd`), except the driver
   (libcuda.so.1), which the NVIDIA container toolkit mounts only when a container starts;
3. the cuDNN major the wheel asks for (its `cudnn` extra) is on the loader path; ORT opens it
   with dlopen, so `ldd` alone cannot see it.

Usage: python check_gpu_libs.py   (exit 0: all good; exit 1: one line per problem on stderr)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

DRIVER_LIBRARY = "libcuda.so.1"
# Requirement lines in onnxruntime-gpu's metadata, e.g. `nvidia-cudnn-cu13~=9.0; extra == "cudnn"`.
CUDA_RUNTIME_REQ = re.compile(r"^nvidia-cuda-runtime[^~=<>]*~=\s*(\d+)")
CUDNN_REQ = re.compile(r"^nvidia-cudnn-cu\d+\s*~=\s*(\d+)")


def wheel_majors() -> tuple[int, int | None]:
    """(CUDA major, cuDNN major or None) that the installed onnxruntime-gpu was built for."""
    from onnxruntime.capi import build_and_package_info as info

    cuda_version = getattr(info, "cuda_version", "")
    if not cuda_version:
        raise SystemExit(
            f"installed {info.package_name} {info.__version__} has no CUDA build "
            "(expected onnxruntime-gpu; is the CPU-only `onnxruntime` installed?)"
        )
    cuda_major = int(cuda_version.split(".")[0])
    cudnn_major = None
    for requirement in metadata.requires("onnxruntime-gpu") or []:
        runtime = CUDA_RUNTIME_REQ.match(requirement)
        if runtime and int(runtime.group(1)) != cuda_major:
            raise SystemExit(
                f"onnxruntime-gpu metadata disagrees with itself: {requirement!r} "
                f"vs cuda_version={cuda_version}"
            )
        cudnn = CUDNN_REQ.match(requirement)
        if cudnn:
            cudnn_major = int(cudnn.group(1))
    return cuda_major, cudnn_major


def unresolved_libraries(provider: Path) -> list[str]:
    """Libraries `ldd` cannot find for the CUDA provider, the driver excepted."""
    listing = subprocess.run(["ldd", str(provider)], capture_output=True, text=True, check=False)
    missing = []
    for line in listing.stdout.splitlines():
        name, _, target = line.strip().partition(" => ")
        if target.startswith("not found") and name != DRIVER_LIBRARY:
            missing.append(name)
    return missing


def loader_has(soname: str) -> bool:
    cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False)
    return any(line.strip().startswith(soname + " ") for line in cache.stdout.splitlines())


def problems() -> list[str]:
    import onnxruntime

    cuda_major, cudnn_major = wheel_majors()
    found: list[str] = []
    base_cuda = os.environ.get("CUDA_VERSION", "")
    if not base_cuda:
        found.append("CUDA_VERSION is not set: expected an nvidia/cuda base image, which sets it")
    elif int(base_cuda.split(".")[0]) != cuda_major:
        found.append(
            f"base image has CUDA {base_cuda} but onnxruntime-gpu {onnxruntime.__version__}"
            f" was built for CUDA {cuda_major}.x: change CUDA_IMAGE in Dockerfile.gpu"
        )
    provider = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not provider.is_file():
        found.append(f"{provider} is missing: expected onnxruntime-gpu's CUDA provider library")
    else:
        missing = unresolved_libraries(provider)
        if missing:
            found.append(
                f"CUDA provider cannot resolve {', '.join(missing)}: expected them from "
                f"the CUDA {cuda_major} runtime base image"
            )
    if cudnn_major is not None and not loader_has(f"libcudnn.so.{cudnn_major}"):
        found.append(
            f"libcudnn.so.{cudnn_major} is not on the loader path: expected a "
            "*-cudnn-runtime-* base image"
        )
    return found


def main() -> int:
    found = problems()
    for problem in found:
        print(f"check_gpu_libs: {problem}", file=sys.stderr)
    if not found:
        print("check_gpu_libs: onnxruntime-gpu's CUDA provider can load in this image")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
