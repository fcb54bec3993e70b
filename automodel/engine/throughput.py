"""What each logged step adds beyond the loss: throughput per device, MFU and peak memory.

MFU is model FLOPs per second per device over the device's dense peak (automodel/flops.py): absent where the
peak is unknown (a CPU, unless `train.peak_tflops` gives one). Memory is the peak so far of the rank that holds
the most (a collective: every rank logs the same steps), on the host (resident set) and, on a GPU, on the
device (what torch's allocator handed out).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from automodel.engine.memory import GiB, peak_host_bytes
# fields of a logged record that are measured (clocks, memory), not computed: they differ between two runs that
# are otherwise bitwise the same (a resumed run and an uninterrupted one)
MEASURED = ("tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "mem_host_gib", "mem_device_gib")


class Throughput:
    def __init__(self, flops_per_token: float, world_size: int, device: torch.device, peak_tflops: float | None):
        self.flops_per_token = flops_per_token
        self.world_size = max(world_size, 1)
        self.device = device
        self.peak = peak_tflops  # per device, TFLOP/s

    def add(self, record: dict) -> None:
        """Fill in the throughput and memory of a logged record (collective under several ranks)."""
        per_device = record["tokens_per_s"] / self.world_size
        record["tokens_per_s_per_device"] = per_device
        tflops = per_device * self.flops_per_token / 1e12
        record["tflops_per_device"] = tflops
        if self.peak:
            record["mfu"] = 100.0 * tflops / self.peak
        record.update(self._memory())

    def _memory(self) -> dict:
        cuda = self.device.type == "cuda"
        peaks = torch.tensor([float(peak_host_bytes()), float(torch.cuda.max_memory_allocated(self.device)) if cuda
                              else 0.0], dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        host, device = peaks.tolist()
        return {"mem_host_gib": host / GiB, **({"mem_device_gib": device / GiB} if cuda else {})}
