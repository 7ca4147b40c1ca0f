"""GPU inventory (NVML or simulated) and how a device is attached to a container."""

from .inventory import (
    GPUInventory,
    GPUProcess,
    NoGPUInventory,
    NvmlInventory,
    SimulatedInventory,
    WarnsOnce,
    detect_inventory,
    parse_simulated_gpus,
)

__all__ = [
    "GPUInventory",
    "GPUProcess",
    "NoGPUInventory",
    "NvmlInventory",
    "SimulatedInventory",
    "WarnsOnce",
    "detect_inventory",
    "parse_simulated_gpus",
]
