"""Device, precision and CUDA-math choices of a job: plain torch, no Lightning.

Separate from ``engine.trainer`` so that inference (``evaluate``, ``predict``) imports them without importing
Lightning, which costs seconds per process on a 2-core CPU and which inference does not use.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast is faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=1)
def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``): what a run's seconds per step
    were measured on, since the same job costs several times more on one CPU than on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def resolve_accelerator(accelerator: str) -> str:
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return accelerator


# What ``precision: auto`` means on a CPU when set (training and inference alike): ``32-true`` keeps a comparison whose
# earlier arms ran in fp32 on a CPU without native bf16 in fp32 on one with it, instead of switching its arithmetic.
CPU_AUTO_PRECISION_ENV = "MEDPRETRAIN_CPU_AUTO_PRECISION"
_CPU_AUTO_CHOICES = ("32-true", "bf16-mixed")


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 autocast on CUDA GPUs with bf16 and on CPUs with native bf16, else 32-bit; on a CPU the
    environment variable ``MEDPRETRAIN_CPU_AUTO_PRECISION`` (``32-true`` or ``bf16-mixed``) overrides that choice."""
    if precision != "auto":
        return precision
    accelerator = resolve_accelerator(accelerator)
    if accelerator in ("gpu", "cuda"):
        # Emulated bf16 (pre-Ampere GPUs) is slower than fp16 autocast.
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    pinned = os.environ.get(CPU_AUTO_PRECISION_ENV, "").strip()
    if pinned:
        if pinned not in _CPU_AUTO_CHOICES:
            from medpretrain.errors import ConfigError

            raise ConfigError(f"environment variable {CPU_AUTO_PRECISION_ENV}={pinned!r} is not a CPU precision; "
                              f"set it to one of {', '.join(_CPU_AUTO_CHOICES)} or unset it (auto: bf16 where the "
                              f"CPU has native bf16)")
        return pinned
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def uses_cuda(accelerator: str) -> bool:
    """Whether a job with this ``--accelerator`` trains on CUDA GPUs."""
    return resolve_accelerator(accelerator) in ("gpu", "cuda")


def cuda_environment(accelerator: str, deterministic: bool) -> None:
    """Environment a deterministic CUDA job needs before CUDA starts: cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG``
    when it creates its first handle, and without ``:4096:8`` (or ``:16:8``) its matrix products are not
    reproducible (and ``torch.use_deterministic_algorithms`` refuses them). Set in this process's environment,
    so DDP processes started from it inherit it; a value the user set is kept."""
    if deterministic and uses_cuda(accelerator):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def lightning_deterministic(deterministic: bool, accelerator: str) -> bool | str:
    """Lightning's ``deterministic`` for our flag. On CUDA ``"warn"``: deterministic kernels wherever PyTorch has
    one, and a warning naming each op that has none, instead of stopping training there; with ``True`` the
    cross-entropy half of DiceCE (``nll_loss2d`` on CUDA), trilinear ``interpolate`` and ``grid_sample`` backward
    raise. On the CPU every op we use is deterministic: the flag itself."""
    return "warn" if deterministic and uses_cuda(accelerator) else deterministic


def configure_cuda_math(accelerator: str, deterministic: bool) -> dict[str, Any]:
    """Process-wide CUDA math settings of a job; returns them for ``run.json`` (empty off CUDA).

    Not deterministic: TF32 for float32 matrix products (``set_float32_matmul_precision("high")``; cuDNN
    convolutions use TF32 by default) and ``cudnn.benchmark`` (the patch and batch are fixed, so the kernels it
    times on the first steps serve every later step). Deterministic: full float32 products and no benchmark
    (timed kernel choices may differ between two runs)."""
    if not uses_cuda(accelerator):
        return {}
    cuda_environment(accelerator, deterministic)
    torch.set_float32_matmul_precision("highest" if deterministic else "high")
    torch.backends.cudnn.benchmark = not deterministic  # the Trainer sets the same (its ``benchmark``)
    return {"tf32_matmul": not deterministic, "cudnn_benchmark": not deterministic,
            "deterministic": lightning_deterministic(deterministic, accelerator),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def cuda_memory_gb(device: torch.device | None = None) -> dict[str, float]:
    """Peak CUDA memory of this process on ``device`` (GB): allocated by tensors and reserved by the caching
    allocator; empty when the device is not CUDA."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return {}
    return {"max_memory_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3),
            "max_memory_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 3)}


def autocast_context(precision: str, device: torch.device):
    """The autocast context matching a Lightning precision string, for inference outside the Trainer."""
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision.startswith("16") and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return torch.autocast(device_type=device.type, enabled=False)
