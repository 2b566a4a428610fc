"""Run one pipeline stage as a child process; record its wall time, peak CPU memory and peak GPU memory.

    python tools/measure_stage.py --name ptq --log stages.jsonl -- python mixed_precision_ptq.py ...

Peak CPU memory is the largest resident set of any process of the stage (getrusage of the waited-for children);
peak GPU memory is the highest `memory.used` nvidia-smi reported while the stage ran (sampled every 0.5 s; all
processes on the GPU, CUDA contexts included), or absent without nvidia-smi. One JSON line per stage is appended
to --log; the stage's exit status is passed on.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time


def gpu_used_mib() -> int | None:
    """GPU memory in use now (MiB, first GPU), or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class GpuPeak(threading.Thread):
    """Samples nvidia-smi until stopped; `peak_mib` is the highest reading."""

    def __init__(self, period_s: float = 0.5):
        super().__init__(daemon=True)
        self.period_s, self.peak_mib, self.stopped = period_s, None, threading.Event()

    def run(self):
        while not self.stopped.is_set():
            used = gpu_used_mib()
            if used is not None:
                self.peak_mib = max(self.peak_mib or 0, used)
            self.stopped.wait(self.period_s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="stage name in the log")
    p.add_argument("--log", required=True, help="JSON-lines file to append the stage's record to")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given")
    sampler = GpuPeak() if shutil.which("nvidia-smi") else None
    gpu_before = gpu_used_mib() if sampler else None
    if sampler:
        sampler.start()
    t0 = time.perf_counter()
    rc = subprocess.call(command)
    wall_s = time.perf_counter() - t0
    if sampler:
        sampler.stopped.set()
        sampler.join()
    peak_rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    record = {"stage": args.name, "rc": rc, "wall_s": round(wall_s, 1), "peak_rss_gib": round(peak_rss_kib / 2**20, 2),
              "gpu_before_mib": gpu_before, "gpu_peak_mib": sampler.peak_mib if sampler else None,
              "command": " ".join(command)}
    with open(args.log, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"[stage {args.name}] rc {rc}, {wall_s:.0f} s, peak RSS {record['peak_rss_gib']} GiB, "
          f"peak GPU {record['gpu_peak_mib']} MiB", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
