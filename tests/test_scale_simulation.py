"""benchmarks/scale_simulation.py --quick: the scale measurement runs end to end (both cache formats, synthetic
CT-like scans, crops, extrapolation) and writes its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_simulation.py"


def test_quick_scale_simulation(tmp_path):
    pytest.importorskip("blosc2")
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text(encoding="utf-8"))
    s, x = r["synthetic"], r["extrapolation"]
    assert s["scans"] == 2 and x["pool_size"] == 1000
    for fmt in ("npy", "blosc2"):
        assert s["prepare"][fmt]["scans_per_cpu_s"] > 0 and x["disk_GB"][fmt] > 0 and x["prepare_core_hours"][fmt] > 0
        assert all(v[fmt]["crops_per_cpu_s"] > 0 and v[fmt]["crops_per_s"] > 0 for v in s["crops"].values())
    assert set(s["crops"]) == {"24_warm", "24_cold", "32_warm", "32_cold"}
    assert s["sizes"]["ratio_total"] > 1.5  # CT-like content compresses; noise alone would not
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "python benchmarks/scale_simulation.py --out docs/results/scale" in readme and "| disk (GB) |" in readme
    assert not list(work.glob("*-npy")) and not list(work.glob("*-blosc2"))  # prepared caches removed
