"""benchmarks/loader_throughput.py --quick --synthetic: every row runs and the report is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_synthetic_run_writes_every_row(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "loader_throughput.py"), "--quick", "--synthetic",
         "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = {r["name"]: r for r in result["rows"]}
    assert not [n for n, r in rows.items() if "error" in r], [r.get("error") for r in rows.values()]
    for prefix in ("finetune/cpu/default", "finetune/cpu/heavy", "finetune/gpu/heavy/device", "volume-fusion/paper",
                   "avsdb/paper", "asa/paper", "alice/paper", "alice/cpu"):
        assert rows[prefix]["samples_per_s"] > 0
    # Device-side work is reported beside the worker rate for the methods that have some.
    assert all("device_work_cpu_ms_per_batch" in rows[n] for n in ("finetune/gpu/heavy/device", "asa/paper",
                                                                    "alice/paper"))
    # The GPU demand comes from the committed FLOP counts (quick runs never count): workers needed per row.
    assert rows["asa/paper"]["gpu"]["samples_per_s"] > 0 and rows["asa/paper"]["workers_needed"] >= 1
    assert {c["after"] for c in result["compare"]} == {"finetune/gpu/default/device", "finetune/gpu/heavy/device"}
    assert "seconds" in result["alice_table"]
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "python benchmarks/loader_throughput.py --seconds" in readme and "--quick" in readme
