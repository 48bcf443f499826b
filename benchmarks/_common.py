"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this folder is on the path)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The processor's model name, for the machine block of a result file."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sh(args: list[str], log: Path) -> None:
    """Run a command (a `medpretrain` verb, as a user types it), appending the command and its output to ``log``."""
    print("$", " ".join(args), flush=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(args) + "\n")
        fh.flush()
        subprocess.run(args, check=True, stdout=fh, stderr=subprocess.STDOUT)
