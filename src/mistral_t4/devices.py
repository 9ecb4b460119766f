"""Which device we run on, what it can do, and what it reports.

A T4 (sm75) has fp16 tensor cores and no bf16, so on CUDA we compute in fp16 everywhere;
on a CPU we compute in fp32, which is also what the correctness tests compare against.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

GIB = 1024**3


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else the first CUDA GPU when there is one, else the CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for, but torch sees no CUDA GPU")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """fp16 on every GPU (the T4 has no bf16; one dtype keeps results comparable), fp32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability, e.g. (7, 5) for a T4; None on CPU."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def set_memory_cap(device: torch.device, cap_gib: float | None) -> None:
    """Let this process use at most `cap_gib` of the GPU (15 GiB stands in for a T4's 16 GB)."""
    if cap_gib is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gib * GIB > total:
        raise ValueError(f"--memory-cap-gib {cap_gib} is more than the GPU has ({total / GIB:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total, device)


def memory_budget_bytes(device: torch.device, cap_gib: float | None = None) -> int | None:
    """Bytes this process may still allocate on `device`: free memory, lowered by the cap. None on CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if cap_gib is not None:
        free = min(free, int(cap_gib * GIB) - torch.cuda.memory_allocated(device))
    return free


def peak_memory_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> dict:
    """Card, driver and library versions, for reports and benchmark JSON."""
    import transformers

    info = {
        "device": str(device),
        "card": platform.processor() or platform.machine(),
        "capability": None,
        "total_memory_gib": None,
        "driver": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "bitsandbytes": _version_of("bitsandbytes"),
        "peft": _version_of("peft"),
        "triton": _version_of("triton"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # the kernel switches set for this run (MISTRAL_T4_NF4_CUDA_ROWS, ...); the cache's path is not one
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MISTRAL_T4_") and k != "MISTRAL_T4_CACHE"},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["card"] = props.name
        info["capability"] = "sm%d%d" % (props.major, props.minor)
        info["total_memory_gib"] = round(props.total_memory / GIB, 1)
        info["driver"] = _nvidia_driver()
    return info


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
