"""Text and file output shared by the tools: byte counts, table rules, JSON reports."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def fmt_bytes(n) -> str:
    """Bytes as B, kB, MB or GB (powers of 10; 3 significant digits, whole units from 100 up); '-' if unknown."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def ms(seconds) -> str:
    """Seconds as milliseconds with two decimals."""
    return f"{1e3 * seconds:.2f}"


def ruled(head: str) -> list:
    """A table's header line and the rule under it."""
    return [head, "-" * len(head)]


def write_json(path, data, indent: int = 1) -> None:
    """Write a report as JSON (the folder must exist)."""
    Path(path).write_text(json.dumps(data, indent=indent))


def machine() -> str:
    """This host in words for a report's metadata: its CPU model and the cores this process may use."""
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        if cpuinfo.exists()
        else []
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{names[0] if names else platform.processor() or platform.machine()}, {cores} CPU cores"
