"""Helpers that write small real image files and datasets for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    """Write ``array`` (spatial first, as nibabel stores it) with ``affine`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array if dtype is None else array.astype(dtype)), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def ras_affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = origin
    return aff


def blob_case(shape=(24, 20, 16), seed=0, classes=2, dtype=np.float32):
    """A noisy image with ``classes`` nested boxes as labels (1..classes) and their intensities."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    sx, sy, sz = shape
    label[sx // 4: 3 * sx // 4, sy // 4: 3 * sy // 4, sz // 4: 3 * sz // 4] = 1
    if classes >= 2:
        label[sx // 3: sx // 2, sy // 3: sy // 2, sz // 3: sz // 2] = 2
    image = (rng.normal(100.0, 5.0, shape) + 40.0 * label).astype(dtype)
    return image, label


def make_nnunet(root: Path, n=4, shape=(24, 20, 16), spacing=(1.0, 1.0, 1.0), channels=("MRI",),
                split: dict | None = None, extra: dict | None = None) -> Path:
    """An nnU-Net v2 raw dataset of ``n`` blob cases named case_000, case_001..."""
    root = Path(root)
    aff = ras_affine(spacing)
    for i in range(n):
        img, lab = blob_case(shape, seed=i)
        for c in range(len(channels)):
            save_nifti(root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz", img + 10 * c, aff)
        save_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", lab, aff)
    meta = {
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": {"background": 0, "outer": 1, "inner": 2},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    meta.update(extra or {})
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    if split is not None:
        (root / "splits.json").write_text(json.dumps(split), encoding="utf-8")
    return root


def make_msd(root: Path, n=3, shape=(24, 20, 16), channels=1) -> Path:
    """An MSD dataset; with ``channels > 1`` the images are 4D."""
    root = Path(root)
    aff = ras_affine((1.0, 1.0, 1.0))
    training = []
    for i in range(n):
        img, lab = blob_case(shape, seed=i)
        if channels > 1:
            img = np.stack([img + 5 * c for c in range(channels)], axis=-1)
        save_nifti(root / "imagesTr" / f"vol_{i}.nii.gz", img, aff)
        save_nifti(root / "labelsTr" / f"vol_{i}.nii.gz", lab, aff)
        training.append({"image": f"./imagesTr/vol_{i}.nii.gz", "label": f"./labelsTr/vol_{i}.nii.gz"})
    meta = {
        "name": "tiny",
        "modality": {str(c): "CT" for c in range(channels)},
        "labels": {"0": "background", "1": "outer", "2": "inner"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def init_report_of_one_step_finetune(model_pt: Path, prepared_root: Path, out: Path) -> dict:
    """Fine-tune a tiny unet for one step from ``model_pt`` (encoder and decoder, ``--init-part all``) and
    return its ``init_report.json`` (what loaded, what was missing, shape mismatches)."""
    from medpretrain.config import AugmentConfig, FinetuneConfig
    from medpretrain.engine.finetune import finetune

    run = finetune(prepared_root, out, FinetuneConfig(
        model="unet", steps=1, patch=(32, 32, 16), batch=1, num_workers=0, precision="32-true",
        init=model_pt, init_part="all", augment=AugmentConfig(enabled=False)))
    return json.loads((run / "init_report.json").read_text(encoding="utf-8"))


def prepared_pool(root: Path, scans):
    """Write ``scans`` (3D arrays, 1 mm) as NIfTI under ``root/scans`` and prepare them as an unlabelled MR pool
    (no body cropping) in ``root/prepared``; returns the ``PreparedData``."""
    from medpretrain.data.cache import prepare
    from medpretrain.data.preprocess import PreprocessConfig

    for i, scan in enumerate(scans):
        save_nifti(root / "scans" / f"scan_{i}.nii.gz", scan, ras_affine())
    return prepare(pool=root / "scans", out=root / "prepared",
                   cfg=PreprocessConfig(spacing=(1.0, 1.0, 1.0), crop_foreground=False, modality="MR"),
                   progress=False)


def smooth_scan(shape, seed: int, amplitude: float = 20.0) -> np.ndarray:
    """A pool scan for the self-supervised methods' tests: a smooth structure plus noise, different for every
    seed (so crops identify their scan), intensities around 100."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = sum(np.cos((2 + seed) * g + seed) for g in grids)
    return (100.0 + amplitude * blob + rng.normal(0, 3.0, shape)).astype(np.float32)
