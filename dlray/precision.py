"""Which precision a run computes in. `precision: auto` (the default) picks what the hardware does natively:

    GPU with bf16 (Ampere and later)         bf16
    GPU without bf16 (V100, T4)              fp16 with loss scaling (DDP: a GradScaler; DeepSpeed: ZeRO unscales by
                                             the strategy's scale before clipping); fp32 under FSDP, which has no loss scaler here
    CPU with AVX512-BF16 or AMX              bf16
    any other CPU (AVX2 only, e.g. Zen 3)    fp32: bf16 there is emulated, ~20x slower than fp32

Each training worker decides for its own device (the driver may have no GPU) and rank 0 prints the
choice and the reason. `detect` also knows the dense bf16 peak of common GPUs, for the loop's `mfu`.
On GPUs with TF32 (Ampere and newer) a CUDA run's fp32 matmuls and convolutions use it (`train.tf32`,
`choose_tf32`). Serve replicas hold their model in `serve.dtype` (`serve_dtype`): bf16 or fp16 on GPUs.
A leaf module: strategies, finetune and the loop import it, it imports none of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A 3x3 conv step on a Zen 3 core: 28 ms in fp32, 659 ms under emulated bf16 autocast.
EMULATED_BF16_SLOWDOWN = "~20x"
# Dense bf16 tensor-core peaks (no sparsity, NVIDIA's datasheets), by the model name in torch.cuda.get_device_name()
# ("NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", "NVIDIA L40S"): the longest entry found there as whole words (an L40
# is not an L4, an H200 not an H20), so "H100 NVL" wins over "H100".
PEAK_BF16_FLOPS = {"H100": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H200": 989e12, "H200 NVL": 835e12, "GH200": 989e12,
                   "H20": 148e12, "B200": 2250e12, "A100": 312e12, "A10G": 70e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12}

# Memory per device (dlray plan, scaling.accelerator_type) by Ray's accelerator_type names (ray.util.accelerators), in GiB as each card reports it.
# The bare "A100" label covers both sizes: the 40 GB card is assumed; name A100-80G for the larger one.
DEVICE_MEMORY_GIB = {
    "H100": 80, "H200": 141, "H20": 96, "B200": 180, "B300": 288, "GB200": 186, "GB300": 288,
    "A100": 40, "A100-40G": 40, "A100-80G": 80, "A10G": 24, "L4": 24, "L40S": 48, "RTX-PRO-6000": 96,
    "V100": 16, "T4": 16, "P100": 16, "P4": 8, "K80": 12,
    "AMD-Instinct-MI100": 32, "AMD-Instinct-MI210": 64, "AMD-Instinct-MI250X-MI250": 64,  # MI250: each of its 2 dies is a device
}
NO_BF16 = {"V100", "T4", "P100", "P4", "K80", "AMD-Instinct-MI100"}  # GPUs before bf16 arithmetic: `auto` picks fp16 (fsdp: fp32)


@dataclass(frozen=True)
class Hardware:
    device_type: str  # "cuda" or "cpu"
    name: str  # the GPU's name, or the CPU's vector capability
    native_bf16: bool  # bf16 arithmetic in hardware, not emulated
    peak_flops: float | None = None  # dense bf16 FLOP/s, where known (GPUs in PEAK_BF16_FLOPS)
    tf32: bool = False  # TensorFloat-32 tensor cores for fp32 matmuls and convolutions (CUDA GPUs from Ampere, compute capability 8.0)


def detect(device: torch.device) -> Hardware:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return Hardware("cuda", name, torch.cuda.is_bf16_supported(including_emulation=False), peak_bf16_flops(name),
                        tf32=torch.cuda.get_device_capability(device) >= (8, 0))
    # The capability ATen dispatches to (ATEN_CPU_CAPABILITY can lower it), and the instructions the CPU has.
    return cpu_hardware(torch.backends.cpu.get_cpu_capability(), torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_hardware(capability: str, bf16_instructions: bool) -> Hardware:
    """A CPU from the vector capability ATen dispatches to ("AVX2", "AVX512", ...) and whether it has
    AVX512-BF16 or AMX: bf16 is native only with both (ATen's bf16 kernels need its AVX512 paths). The
    three kinds CI machines come as (native bf16, AVX512 without bf16, AVX2 only) are tested through this."""
    return Hardware("cpu", f"this CPU ({capability})", capability.startswith("AVX512") and bf16_instructions)


def peak_bf16_flops(gpu_name: str) -> float | None:
    """The dense bf16 peak of the GPU named so, if PEAK_BF16_FLOPS knows it."""
    matches = [part for part in PEAK_BF16_FLOPS if re.search(rf"(?<!\w){re.escape(part)}(?!\w)", gpu_name)]  # "A100-SXM4-80GB" is an A100
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def choose(requested: Literal["auto"] | Precision, hardware: Hardware, strategy: str) -> tuple[Precision, str]:
    """(precision, why): `requested` unless it is `auto`, else what `hardware` computes natively."""
    if requested != "auto":
        return requested, "set in the job config"
    if hardware.native_bf16:
        return "bf16", f"precision auto: {hardware.name} computes bf16 natively"
    if hardware.device_type == "cuda":
        if strategy == "fsdp":
            return "fp32", f"precision auto: {hardware.name} has no bf16, and FSDP here has no loss scaler for fp16"
        return "fp16", f"precision auto: {hardware.name} has no bf16; fp16 with loss scaling"
    return "fp32", f"precision auto: {hardware.name} has no AVX512-BF16 or AMX, so bf16 would be emulated ({EMULATED_BF16_SLOWDOWN} slower than fp32)"


def resolve(requested: Literal["auto"] | Precision, device: torch.device, strategy: str) -> Precision:
    """`requested`, or what `auto` picks on `device`, without the reason."""
    return choose(requested, detect(device), strategy)[0]


def choose_tf32(hardware: Hardware, precision: Precision, enabled: bool) -> tuple[bool, str]:
    """(on, what the precision line adds) for a training worker: TF32 for fp32 matmuls and convolutions
    on a GPU that has it, unless the job turns it off (`enabled`: train.tf32). Under bf16 / fp16 autocast
    it is on too (harmless: the matmuls autocast leaves in fp32 use it), but the line is about fp32 runs."""
    if hardware.device_type != "cuda":
        return False, ""
    on = enabled and hardware.tf32
    if precision != "fp32":
        return on, ""
    if on:
        return True, "TF32 matmuls and convolutions on (train.tf32 false for full fp32)"
    return False, "TF32 off (train.tf32 false): full fp32 matmuls" if hardware.tf32 else f"{hardware.name} has no TF32: full fp32 matmuls"


def set_tf32(on: bool) -> None:
    """This process's fp32 matmuls (cuBLAS) and cuDNN convolutions: TF32 (fp32's range, a 10-bit mantissa) or full
    fp32. Both switches: torch's defaults are full fp32 for matmuls but TF32 for cuDNN convolutions."""
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on


def serve_dtype(requested: Literal["auto"] | Precision, hardware: Hardware) -> Precision:
    """The dtype a Serve replica holds its model in (`serve.dtype`): `requested` unless it is `auto`, which is
    bf16 on a GPU that computes it natively, fp16 on an older GPU, and fp32 on a CPU (the export's own dtype:
    a CPU replica computes on one thread, and most CPUs would only emulate bf16)."""
    if requested != "auto":
        return requested
    if hardware.device_type == "cuda":
        return "bf16" if hardware.native_bf16 else "fp16"
    return "fp32"


def slowdown_warning(precision: str, hardware: Hardware) -> str | None:
    """What to tell a user who asked for bf16 on a CPU that can only emulate it."""
    if precision == "bf16" and hardware.device_type == "cpu" and not hardware.native_bf16:
        return (f"precision bf16 on {hardware.name}, which has no AVX512-BF16 or AMX: bf16 is emulated and training runs "
                f"{EMULATED_BF16_SLOWDOWN} slower than in fp32; precision auto picks fp32 here")
    return None
