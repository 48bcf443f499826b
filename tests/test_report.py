"""Report files and figures written to tmp_path and read back."""

from __future__ import annotations

import csv
import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from medpretrain.evaluation import (
    PER_CASE_COLUMNS,
    save_label_efficiency_plot,
    save_overlay,
    save_training_curve,
    write_evaluation,
)


def _per_case():
    return {
        "case_b": {
            1: {"dice": 0.5, "nsd": 0.6, "assd": 2.0, "hd95": 6.0, "pred_voxels": 90.0, "label_voxels": 100.0},
            2: {"dice": 0.3, "nsd": 0.4, "assd": 4.0, "hd95": 9.0, "pred_voxels": 10.0, "label_voxels": 20.0},
        },
        "case_a": {
            1: {"dice": 0.9, "nsd": 0.95, "assd": 0.5, "hd95": 1.5, "pred_voxels": 100.0, "label_voxels": 100.0},
            2: {"dice": 0.7, "nsd": 0.8, "assd": 1.0, "hd95": 3.0, "pred_voxels": 18.0, "label_voxels": 20.0},
        },
    }


def _colour_pixels(png: np.ndarray):
    rgb = png[..., :3]
    red = (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    green = (rgb[..., 1] > 0.6) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)
    return int(red.sum()), int(green.sum())


def _case_volumes():
    rng = np.random.default_rng(0)
    image = rng.normal(0.3, 0.05, size=(40, 36, 24)).astype(np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[10:25, 10:22, 6:16] = 1
    label[28:34, 12:18, 8:14] = 2
    image[label == 1] += 0.3
    prediction = np.roll(label, 3, axis=0)
    return image, label, prediction


def test_write_evaluation_writes_three_files(tmp_path):
    out = tmp_path / "eval"
    image, label, prediction = _case_volumes()
    overlay = save_overlay(image, label, prediction, out / "overlays" / "case_a.png", title="case_a")
    context = {"run": "demo-run", "model": "unet", "checkpoint": tmp_path / "best.ckpt", "nsd_tolerance_mm": 2.0,
               "inference": {"sw_batch_size": 2, "overlap": 0.5}, "note": "a|b"}
    metrics = write_evaluation(out, _per_case(), {1: "organ_a", 2: "organ_b"}, context, overlays=[overlay])

    assert {p.name for p in out.iterdir()} == {"metrics.json", "per_case.csv", "report.md", "overlays"}

    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert saved == metrics
    assert saved["n_cases"] == 2
    assert saved["classes"]["organ_a"]["dice"]["mean"] == pytest.approx(0.7)
    assert saved["overall"]["dice"]["mean"] == pytest.approx(np.mean([0.4, 0.8]))
    assert saved["context"]["run"] == "demo-run"
    assert saved["context"]["checkpoint"] == str(tmp_path / "best.ckpt")

    with (out / "per_case.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2
    assert tuple(rows[0]) == PER_CASE_COLUMNS
    assert [(r["case_id"], r["class_id"]) for r in rows] == [("case_a", "1"), ("case_a", "2"), ("case_b", "1"), ("case_b", "2")]
    assert rows[3]["class_name"] == "organ_b" and float(rows[3]["hd95"]) == 9.0 and rows[3]["pred_voxels"] == "10"

    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| Class | Dice | NSD | ASSD (mm) | HD95 (mm) |" in report
    assert "| organ_a | 0.700 ± 0.283 |" in report
    assert "**overall**" in report
    assert "](overlays/case_a.png)" in report
    assert "| model | unet |" in report
    assert "a\\|b" in report  # pipes in context values must not break the table
    assert "Worst: case_b" in report and "Best: case_a" in report
    assert "diagonal of the volume" in report
    assert "training curve" not in report.lower()


def test_write_evaluation_links_training_curve(tmp_path):
    curve = tmp_path / "run" / "curve.png"
    curve.parent.mkdir()
    curve.write_bytes(b"png")
    out = tmp_path / "run" / "eval"
    write_evaluation(out, _per_case(), {1: "a", 2: "b"}, {}, training_curve=curve)
    assert "](../curve.png)" in (out / "report.md").read_text(encoding="utf-8")


def test_save_overlay_draws_red_and_green(tmp_path):
    image, label, prediction = _case_volumes()
    path = save_overlay(image, label, prediction, tmp_path / "o.png", title="t", spacing=(1.0, 1.5, 3.0))
    assert path.is_file() and path.stat().st_size < 300_000
    png = mpimg.imread(path)
    assert png.ndim == 3 and png.shape[2] in (3, 4) and png.shape[1] > png.shape[0] > 200
    n_red, n_green = _colour_pixels(png)
    assert n_red > 50 and n_green > 50


def test_save_overlay_without_label_and_empty_prediction(tmp_path):
    image, _, prediction = _case_volumes()
    path = save_overlay(image, None, prediction, tmp_path / "p.png")
    n_red, n_green = _colour_pixels(mpimg.imread(path))
    assert n_red > 50 and n_green == 0
    path = save_overlay(image, None, np.zeros_like(prediction), tmp_path / "e.png")
    assert path.is_file()


def test_save_training_curve_with_gaps(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    lines = ["epoch,step,train/loss,train/lr,val/loss"]
    for step in range(0, 60):
        loss = f"{2.0 * np.exp(-step / 20) + 0.05 * np.sin(step):.4f}" if step % 3 else ""
        lr = f"{1e-3 * (1 - step / 60):.6g}" if step % 5 == 0 else ""
        lines.append(f"0,{step},{loss},{lr},")
    lines.append("0,59,,,0.4")
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = save_training_curve(csv_path, tmp_path / "curve.png", title="loss")
    assert out == tmp_path / "curve.png" and out.is_file()
    assert mpimg.imread(out).ndim == 3


def test_save_training_curve_returns_none_without_loss(tmp_path):
    assert save_training_curve(tmp_path / "missing.csv", tmp_path / "c.png") is None
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train/lr\n0,1,0.001\n", encoding="utf-8")
    assert save_training_curve(csv_path, tmp_path / "c.png") is None
    csv_path.write_text("epoch,step,train/loss\n0,1,\n0,2,\n", encoding="utf-8")
    assert save_training_curve(csv_path, tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


def test_save_label_efficiency_plot(tmp_path):
    rows = [
        {"method": m, "n_labeled": n, "seed": s, "dice": base + 0.05 * np.log2(n) + 0.01 * s}
        for m, base in (("scratch", 0.4), ("mae", 0.5))
        for n in (2, 4, 8, 16)
        for s in range(3)
    ]
    rows.append({"method": "mae", "n_labeled": 32, "seed": 0, "dice": float("nan")})
    path = save_label_efficiency_plot(rows, tmp_path / "le.png", metric="dice")
    assert path.is_file() and mpimg.imread(path).ndim == 3
    assert save_label_efficiency_plot([], tmp_path / "empty.png").is_file()
