"""What a GPU offers, by name, with where each figure comes from; and the peak FLOP rate a run's MFU is measured
against (`train.peak_tflops`, else the table for a known GPU, else this device's measured matmul rate).

Figures are per GPU of an 8-GPU SXM server: dense (no sparsity) tensor-core peak, NVLink bandwidth in one direction
(half the datasheet's bidirectional figure), and the server's network bandwidth per GPU (one NIC per GPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    """Usable memory (nvidia-smi's total), GiB."""
    peak_tflops: dict[str, float]
    """Dense matmul peak by training precision ('bf16', 'fp32'), TFLOP/s."""
    intra_node_GBps: float
    """NVLink, one direction, GB/s."""
    inter_node_GBps: float
    """Network per GPU, one direction, GB/s."""
    sources: dict[str, str]
    """Field -> where its value comes from."""


_H100 = GpuSpec(
    name="NVIDIA H100 SXM5 80GB", memory_gib=79.6, peak_tflops={"bf16": 989.0, "fp32": 67.0},
    intra_node_GBps=450.0, inter_node_GBps=50.0,
    sources={"memory_gib": "nvidia-smi total 81559 MiB",
             "peak_tflops": "NVIDIA H100 datasheet (SXM): BF16 tensor core 1979 TFLOPS with sparsity = 989 dense, "
                            "FP32 67 TFLOPS",
             "intra_node_GBps": "NVLink 4: 900 GB/s per GPU in both directions together (NVIDIA datasheet), "
                                "450 each way",
             "inter_node_GBps": "DGX H100/H200: one 400 Gb/s ConnectX-7 (NDR InfiniBand) per GPU = 50 GB/s each way"})

GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec(
        name="NVIDIA A100 SXM4 80GB", memory_gib=80.0, peak_tflops={"bf16": 312.0, "fp32": 19.5},
        intra_node_GBps=300.0, inter_node_GBps=25.0,
        sources={"memory_gib": "nvidia-smi total 81920 MiB",
                 "peak_tflops": "NVIDIA A100 datasheet: BF16 tensor core 312 TFLOPS dense (624 with sparsity), "
                                "FP32 19.5 TFLOPS",
                 "intra_node_GBps": "NVLink 3: 600 GB/s per GPU in both directions together (NVIDIA datasheet), "
                                    "300 each way",
                 "inter_node_GBps": "DGX A100: one 200 Gb/s ConnectX-6 (HDR InfiniBand) per GPU = 25 GB/s each way"}),
    "h100": _H100,
    # The H100's chip, links and network with more memory (NVIDIA H200 datasheet: the same 1979 sparse BF16 TFLOPS).
    "h200": replace(_H100, name="NVIDIA H200 SXM 141GB", memory_gib=140.4,
                    sources={**_H100.sources, "memory_gib": "nvidia-smi total 143771 MiB",
                             "peak_tflops": "NVIDIA H200 datasheet (SXM): BF16 tensor core 1979 TFLOPS with sparsity "
                                            "= 989 dense, FP32 67 TFLOPS"}),
}


def known_gpu(device_name: str) -> str | None:
    """The GPUS key a CUDA device name (torch.cuda.get_device_name) belongs to, if any (the table holds SXM parts:
    a PCIe card, slower, is not one of them)."""
    lowered = device_name.lower()
    if "pcie" in lowered:
        return None
    return next((key for key in GPUS if key in lowered), None)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """The best dense matmul rate of `repeats` products of two size x size matrices on `device`, TFLOP/s."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9) / 1e12


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peak_tflops(configured: float | None, device: torch.device, precision: str) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from) that MFU is measured against."""
    if configured is not None:
        return configured, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = known_gpu(name)
        if key is not None:
            return GPUS[key].peak_tflops[precision], f"{GPUS[key].name} table ({GPUS[key].sources['peak_tflops']})"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measured_matmul_tflops(device, dtype), f"measured: 1024 x 1024 {precision} matmul on {device.type}"
