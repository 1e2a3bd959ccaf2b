"""What this machine's CPU offers INT8 inference, as the kernel reports it (the flags of /proc/cpuinfo, lscpu's
model name): ONNX Runtime's U8S8 kernels use the VNNI / AMX dot-product instructions where they exist, and on
AVX2 alone can saturate their 16-bit intermediate sums, which a reduced weight range avoids."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

# The instructions that multiply-add u8 × s8 into 32 bits without a 16-bit intermediate.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
SHOWN_FLAGS = ("avx2", "avx512f", *INT8_DOT_FLAGS)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_int8_dot_product(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in INT8_DOT_FLAGS)


def cpu_description() -> str:
    """The processor and the vector extensions that decide INT8 speed, as lscpu reports them."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = [flag for flag in SHOWN_FLAGS if flag in flags]
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, {' '.join(wanted)}"
