"""The machine a training run uses: CPU threads per process (set_threads) and the peak memory of
the run itself (MemoryPeak: resident set on CPU, allocated memory on CUDA), which the train
stage keeps in its manifest."""

from __future__ import annotations

import os
from pathlib import Path


def set_threads(log) -> int:
    """Every core this process may run on, shared among the processes of one machine (torchrun's
    LOCAL_WORLD_SIZE), unless OMP_NUM_THREADS says otherwise: torch's own default counts the
    machine's cores, not the ones the process is allowed, nor the other ranks on them."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        log(f"  {threads} CPU threads per process")
    return threads


class MemoryPeak:
    """The peak memory between start() and peak(): on Linux the resident-set high-water mark is
    reset first (/proc/self/clear_refs), so the data stages run earlier in this process do not
    count; on CUDA torch's peak allocated bytes."""

    def start(self) -> None:
        import torch

        self.reset = False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            pass
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> dict:
        import torch

        out = {}
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out["peak_rss_mib"] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            import resource

            out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if not self.reset:
            out["peak_rss_since"] = "process start"
        if torch.cuda.is_available():
            out["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out
