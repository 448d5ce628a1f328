"""What machine a benchmark ran on: the CPU's model, vendor, vector ISA, cores and L3.

An optimizer step's speed on a CPU depends on more than its bandwidth: a reduction that takes a
square root and a division per element is bound by the divider on one machine and by memory on
another, and two vCPUs may be two cores or one core's two hyper-threads sharing that divider.
Sources: /proc/cpuinfo and `lscpu` (Linux); where they are missing (macOS, a container without
lscpu) the description says "unknown" for what it cannot know rather than failing.
"""
from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

# The vector extensions the compiled kernels (and torch's own) choose between, in the order
# printed: x86 (cpuinfo "flags") and aarch64 (cpuinfo "Features").
ISA_FLAGS = ("avx512f", "avx512_bf16", "avx2", "fma", "asimd", "sve", "sve2")
# cpuinfo's vendor_id -> the short name of bench/results/cpu-<vendor>.md
_VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


@dataclass
class CpuInfo:
    model: str
    vendor: str  # short, lower case: "intel", "amd", else what the system calls it
    flags: tuple[str, ...] | None  # the ISA_FLAGS the CPU has; None where unknown
    torch_capability: str  # what torch's CPU kernels dispatch to (e.g. "AVX512", "DEFAULT")
    cpus: int | None  # logical CPUs this process may run on
    threads_per_core: int | None
    l3: str | None  # lscpu's wording, e.g. "32 MiB (1 instance)"

    def describe(self) -> str:
        """One line for a report header."""
        flags = "unknown" if self.flags is None else ", ".join(self.flags) or "none of " + ", ".join(ISA_FLAGS)
        if self.threads_per_core is None:
            topology = "threads per core unknown"
        elif self.threads_per_core == 1:
            topology = "1 thread per core (no two CPUs share a core)"
        else:
            topology = f"{self.threads_per_core} threads per core (CPUs may be hyper-threads of one core)"
        return (f"CPU: {self.model} (vendor {self.vendor}, {platform.machine()}); vector ISA: {flags}; "
                f"torch's CPU kernels dispatch to {self.torch_capability}; "
                f"{self.cpus if self.cpus is not None else 'unknown'} CPUs, {topology}; L3 {self.l3 or 'unknown'}")


def _field(text: str | None, name: str) -> str | None:
    """The value of the first `name: value` line of cpuinfo or lscpu text."""
    if text is None:
        return None
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def parse(cpuinfo: str | None, lscpu: str | None) -> CpuInfo:
    """The description from the texts of /proc/cpuinfo and `lscpu` (each None where missing)."""
    model = (_field(cpuinfo, "model name") or _field(lscpu, "Model name")
             or platform.processor() or platform.machine() or "unknown")
    vendor_id = _field(cpuinfo, "vendor_id") or _field(lscpu, "Vendor ID")
    vendor = _VENDORS.get(vendor_id, (vendor_id or platform.machine() or "unknown").lower())
    flag_text = _field(cpuinfo, "flags") or _field(cpuinfo, "Features") or _field(lscpu, "Flags")
    flags = None if flag_text is None else tuple(f for f in ISA_FLAGS if f in flag_text.split())
    threads = _field(lscpu, "Thread(s) per core")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return CpuInfo(model=model, vendor=vendor, flags=flags,
                   torch_capability=torch.backends.cpu.get_cpu_capability(), cpus=cpus,
                   threads_per_core=int(threads) if threads and threads.isdigit() else None,
                   l3=_field(lscpu, "L3 cache") or _field(lscpu, "L3"))


def _read_cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def _run_lscpu() -> str | None:
    try:  # C locale: the field names parse() looks for
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10,
                              env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU."""
    return parse(_read_cpuinfo(), _run_lscpu())
