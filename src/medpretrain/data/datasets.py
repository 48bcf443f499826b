"""Finding the images and labels of a dataset on disk.

Three labelled layouts are understood:

* nnU-Net v2 raw: ``dataset.json`` with ``channel_names``, ``labels`` ({name: id}) and
  ``file_ending``; ``imagesTr/CASE_0000<ending>`` (one file per channel) and
  ``labelsTr/CASE<ending>``.
* Medical Segmentation Decathlon (MSD): ``dataset.json`` with a ``training`` list of
  ``{"image", "label"}`` paths relative to the dataset folder; a 4D image holds the channels.
* Plain folders, no ``dataset.json``: ``images/`` + ``labels/`` (or ``imagesTr/`` +
  ``labelsTr/``) matched by file name, an image name may carry a ``_0000`` channel suffix.

When a ``dataset.json`` carries both the nnU-Net and the MSD keys, the nnU-Net reading wins.
Unlabelled pools are found by :func:`discover_pool`.
"""

from __future__ import annotations

import glob as _glob
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medpretrain.data.io import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    image_suffix,
    is_dicom_file,
    read_image,
    strip_image_suffix,
)
from medpretrain.errors import DataError

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_NNUNET_KEYS = ("channel_names", "labels", "file_ending")
_NNUNET_ONLY_KEYS = ("channel_names", "file_ending")
_MSD_KEYS = ("training", "labels")
_MR_NAMES = {
    "MR", "MRI", "T1", "T2", "T1W", "T2W", "T1CE", "T1GD", "T1C", "FLAIR", "ADC", "DWI", "PD",
    "SWI", "LGE", "CMR", "CINE", "HBV", "NONCONTRAST", "GADO",
}


@dataclass
class CaseSource:
    """The files of one case.

    Attributes:
        case_id: unique id, e.g. ``"la_003"``.
        images: one file per channel (nnU-Net ``CASE_0000``, ``CASE_0001``...) or one 4D file.
        label: the label map file, or None (unlabelled).
        modality: ``"CT"``/``"MR"`` when known for this case alone (pool lists), else None.
    """

    case_id: str
    images: list[Path]
    label: Path | None
    modality: str | None = None


@dataclass
class DatasetSource:
    """A labelled dataset found on disk.

    Attributes:
        root: the dataset folder.
        layout: ``"msd"``, ``"nnunet"`` or ``"folders"``.
        cases: the cases, sorted by id.
        labels: class id -> name, including 0 (background).
        channel_names: one name per input channel.
        modality: ``"CT"``, ``"MR"`` or None (unknown).
        split: ``{"train": [...], "test": [...]}`` from ``splits.json`` / ``splits_final.json``
            beside ``dataset.json``, or None.
    """

    root: Path
    layout: str
    cases: list[CaseSource]
    labels: dict[int, str]
    channel_names: list[str]
    modality: str | None
    split: dict[str, list[str]] | None = field(default=None)

    @property
    def case_ids(self) -> list[str]:
        """The case ids, in order."""
        return [c.case_id for c in self.cases]


def modality_from_names(names) -> str | None:
    """Map channel / modality names to ``"CT"``, ``"MR"`` or None.

    Args:
        names: a string, a list of strings or a dict whose values are strings
            (``dataset.json``'s ``modality`` or ``channel_names``).
    """
    if names is None:
        return None
    if isinstance(names, dict):
        values = [str(v) for _, v in sorted(names.items(), key=lambda kv: str(kv[0]))]
    elif isinstance(names, str):
        values = [names]
    else:
        values = [str(v) for v in names]
    norm = [re.sub(r"[^A-Z0-9]", "", v.upper()) for v in values]
    if norm and all(v == "CT" or v.startswith("CT") for v in norm):
        return "CT"
    if any(v in _MR_NAMES or v.startswith(("T1", "T2", "MR")) for v in norm):
        return "MR"
    if any(v == "CT" for v in norm):
        return "CT"
    return None


def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: is not valid JSON ({exc}); fix the file") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _parse_labels(raw, path: Path) -> dict[int, str]:
    """Accept nnU-Net v2 ``{name: id}`` and MSD ``{"id": name}`` label dictionaries."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: 'labels' must be a non-empty dictionary, got {raw!r}")
    out: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise DataError(
                f"{path}: label {key!r} is a region ({value}); region-based labels are not supported, "
                "declare one integer id per class"
            )
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            cid, name = int(value), str(key)  # nnU-Net v2: name -> id
        elif isinstance(value, str) and re.fullmatch(r"-?\d+", str(key)):
            cid, name = int(key), value  # MSD: "id" -> name
        elif isinstance(value, str) and re.fullmatch(r"-?\d+", value):
            cid, name = int(value), str(key)
        else:
            raise DataError(f"{path}: cannot read label entry {key!r}: {value!r}; use {{\"name\": id}} entries")
        if cid < 0:
            raise DataError(f"{path}: label {name!r} has negative id {cid}; ids must be 0, 1, 2, ...")
        if cid in out:
            raise DataError(f"{path}: label id {cid} is declared twice ({out[cid]!r} and {name!r})")
        out[cid] = name
    if 0 not in out:
        out[0] = "background"
    return dict(sorted(out.items()))


def _channel_list(raw, path: Path) -> list[str]:
    if isinstance(raw, dict):
        try:
            items = sorted(raw.items(), key=lambda kv: int(kv[0]))
        except ValueError as exc:
            raise DataError(f"{path}: channel keys must be \"0\", \"1\", ...; got {list(raw)}") from exc
        return [str(v) for _, v in items]
    if isinstance(raw, (list, tuple)):
        return [str(v) for v in raw]
    if isinstance(raw, str):
        return [raw]
    raise DataError(f"{path}: cannot read channel names {raw!r}; use {{\"0\": \"CT\"}}")


def _first_missing(paths: list[Path], root: Path, what: str, where: str = "listed in dataset.json",
                   fix: str = "fix the paths in dataset.json or add the files") -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        shown = ", ".join(str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{root}: {len(missing)} {what} {where} do not exist: {shown}{more}; {fix}")


def _check_duplicates(ids: list[str], where: Path) -> None:
    dup = sorted(k for k, v in Counter(ids).items() if v > 1)
    if dup:
        raise DataError(
            f"{where}: duplicate case ids {dup[:10]}; every case needs a unique file name "
            "(rename or remove the duplicates)"
        )


def _discover_nnunet(root: Path, meta: dict, meta_path: Path) -> tuple[list[CaseSource], list[str]]:
    channels = _channel_list(meta["channel_names"], meta_path)
    ending = str(meta["file_ending"])
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DataError(f"{root}: no imagesTr/ folder; an nnU-Net v2 raw dataset keeps its images in imagesTr/")
    if not labels_dir.is_dir():
        raise DataError(f"{root}: no labelsTr/ folder; an nnU-Net v2 raw dataset keeps its labels in labelsTr/")
    by_case: dict[str, dict[int, Path]] = {}
    odd: list[str] = []
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ending):
            continue
        m = _CHANNEL_SUFFIX.match(f.name[: -len(ending)])
        if not m:
            odd.append(f.name)
            continue
        by_case.setdefault(m["case"], {})[int(m["channel"])] = f
    if odd:
        raise DataError(
            f"{images_dir}: files without the _XXXX channel suffix: {odd[:5]}; nnU-Net images are named "
            f"CASE_0000{ending} (one file per channel)"
        )
    cases: list[CaseSource] = []
    bad_channels: list[str] = []
    for cid in sorted(by_case):
        files = by_case[cid]
        if sorted(files) != list(range(len(channels))):
            bad_channels.append(f"{cid} has channels {sorted(files)}")
            continue
        cases.append(CaseSource(cid, [files[i] for i in range(len(channels))], labels_dir / f"{cid}{ending}"))
    if bad_channels:
        raise DataError(
            f"{images_dir}: dataset.json declares {len(channels)} channel(s) (_0000.._{len(channels) - 1:04d}) "
            f"but {'; '.join(bad_channels[:5])}; add the missing channel files or fix channel_names"
        )
    # nnU-Net's dataset.json lists no files: the labels are the ones imagesTr/ implies.
    _first_missing([c.label for c in cases if c.label is not None], root, "label file(s)",
                   where="of the cases in imagesTr/", fix="add the labels or move those cases' images out of imagesTr/")
    return cases, channels


def _msd_id(entry_image: Path, entry_label: Path | None) -> str:
    name = strip_image_suffix((entry_label or entry_image).name)
    if entry_label is None:
        m = _CHANNEL_SUFFIX.match(name)
        name = m["case"] if m else name
    return name


def _discover_msd(root: Path, meta: dict, meta_path: Path) -> tuple[list[CaseSource], list[str]]:
    training = meta["training"]
    if not isinstance(training, list) or not training:
        raise DataError(f"{meta_path}: 'training' must be a non-empty list of {{\"image\", \"label\"}} entries")
    cases: list[CaseSource] = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(f"{meta_path}: training entry {i} ({entry!r}) has no 'image'; use {{\"image\": ..., \"label\": ...}}")
        imgs = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        images = [(root / str(p)).resolve() for p in imgs]
        label = (root / str(entry["label"])).resolve() if entry.get("label") else None
        if label is None:
            raise DataError(f"{meta_path}: training entry {i} ({entry!r}) has no 'label'; every training case needs one")
        cases.append(CaseSource(_msd_id(images[0], label), images, label))
    _first_missing([p for c in cases for p in c.images], root, "image file(s)")
    _first_missing([c.label for c in cases if c.label is not None], root, "label file(s)")
    raw_channels = meta.get("modality") or meta.get("channel_names") or {"0": "image"}
    return cases, _channel_list(raw_channels, meta_path)


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        f for f in folder.iterdir()
        if f.is_file() and not f.name.startswith(".") and image_suffix(f) in IMAGE_SUFFIXES
    )


def _discover_folders(root: Path) -> tuple[list[CaseSource], list[str], dict[int, str]]:
    for img_name, lab_name in (("images", "labels"), ("imagesTr", "labelsTr")):
        images_dir, labels_dir = root / img_name, root / lab_name
        if images_dir.is_dir() and labels_dir.is_dir():
            break
    else:
        raise DataError(
            f"{root}: no cases found: expected a dataset.json (nnU-Net v2 or MSD), or images/ + labels/ "
            "(or imagesTr/ + labelsTr/) folders with matching file names"
        )
    label_files = _list_images(labels_dir)
    _check_duplicates([strip_image_suffix(f.name) for f in label_files], labels_dir)
    labels = {strip_image_suffix(f.name): f for f in label_files}
    by_case: dict[str, list[tuple[int, Path]]] = {}
    for f in _list_images(images_dir):
        stem = strip_image_suffix(f.name)
        if stem in labels:
            by_case.setdefault(stem, []).append((0, f))
            continue
        m = _CHANNEL_SUFFIX.match(stem)
        if m and m["case"] in labels:
            by_case.setdefault(m["case"], []).append((int(m["channel"]), f))
        else:
            by_case.setdefault(stem, []).append((-1, f))
    unlabelled = sorted(str(f.name) for entries in by_case.values() for ch, f in entries if ch < 0)
    if unlabelled:
        raise DataError(
            f"{images_dir}: {len(unlabelled)} image(s) without a label in {labels_dir.name}/: "
            f"{unlabelled[:5]}{' ...' if len(unlabelled) > 5 else ''}; add the labels (same file name, "
            "without the _0000 channel suffix) or move these images out"
        )
    orphans = sorted(k for k in labels if k not in by_case)
    if orphans:
        raise DataError(
            f"{labels_dir}: {len(orphans)} label(s) without an image: {orphans[:5]}; add the images or remove the labels"
        )
    cases: list[CaseSource] = []
    n_channels: set[int] = set()
    for cid in sorted(by_case):
        entries = sorted(by_case[cid])
        chans = [c for c, _ in entries]
        if len(set(chans)) != len(chans):
            raise DataError(f"{images_dir}: duplicate case ids ['{cid}']; several images map to the same case: "
                            f"{[f.name for _, f in entries]}; rename or remove the duplicates")
        n_channels.add(len(entries))
        cases.append(CaseSource(cid, [f for _, f in entries], labels[cid]))
    if not cases:
        raise DataError(f"{root}: no cases found in {images_dir.name}/ and {labels_dir.name}/; add image and label files")
    if len(n_channels) > 1:
        raise DataError(f"{images_dir}: cases have different numbers of channel files ({sorted(n_channels)}); "
                        "every case needs the same channels")
    label_names = {int(v): ("background" if int(v) == 0 else f"class_{int(v)}") for v in _label_values_of(cases)}
    label_names.setdefault(0, "background")
    nch = n_channels.pop()
    return cases, [f"channel_{i}" for i in range(nch)], dict(sorted(label_names.items()))


def _label_values_of(cases: list[CaseSource]) -> set[int]:
    """The label ids found in all label files: without dataset.json nothing declares the classes, and one file
    need not hold them all (a case with a class the first file lacks would be refused as undeclared). A file
    that cannot be read, or holds non-integer values, adds nothing here: its case is reported when prepared."""
    values: set[int] = set()
    for case in cases:
        try:
            found = np.unique(read_image(case.label).array)
        except DataError:
            continue
        if found.size and np.all(np.isfinite(found)) and np.all(np.equal(np.mod(found, 1), 0)) and found.min() >= 0:
            values.update(int(v) for v in found)
    return values


def _read_split(root: Path) -> dict[str, list[str]] | None:
    for name in ("splits.json", "splits_final.json"):
        path = root / name
        if not path.is_file():
            continue
        raw = _load_json(path)
        if isinstance(raw, list):
            # nnU-Net's splits_final.json: a list of folds; fold 0's val serves as the test set.
            if not raw or not isinstance(raw[0], dict) or "train" not in raw[0] or "val" not in raw[0]:
                raise DataError(f"{path}: expected a list of folds [{{\"train\": [...], \"val\": [...]}}, ...]")
            return {"train": [str(x) for x in raw[0]["train"]], "test": [str(x) for x in raw[0]["val"]]}
        if isinstance(raw, dict):
            test_key = next((k for k in ("test", "val", "validation") if k in raw), None)
            if "train" not in raw or test_key is None:
                raise DataError(f"{path}: expected {{\"train\": [...], \"test\": [...]}}, got keys {sorted(raw)}")
            return {"train": [str(x) for x in raw["train"]], "test": [str(x) for x in raw[test_key]]}
        raise DataError(f"{path}: expected {{\"train\": [...], \"test\": [...]}}")
    return None


def check_split(split: dict[str, list[str]], case_ids, where: str | Path) -> None:
    """Raise DataError if a split names unknown cases or puts a case in two sets.

    Args:
        split: ``{"train": [...], "test": [...]}``.
        case_ids: the known case ids.
        where: the split file or dataset folder, for the message.
    """
    known = set(case_ids)
    unknown = sorted({cid for ids in split.values() for cid in ids if cid not in known})
    if unknown:
        raise DataError(
            f"{where}: the split names {len(unknown)} case(s) that are not in the dataset: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}; fix splits.json or add the cases"
        )
    both = sorted(set(split.get("train", [])) & set(split.get("test", [])))
    if both:
        raise DataError(f"{where}: cases {both[:5]} are in both train and test; fix splits.json")


def discover_dataset(root: str | os.PathLike) -> DatasetSource:
    """Find the cases, labels, channels and split of a labelled dataset folder.

    Args:
        root: the dataset folder (nnU-Net v2 raw, MSD, or images/ + labels/ folders).

    Returns:
        The dataset description with cases sorted by id.

    Raises:
        DataError: dataset.json lacks required keys, lists missing files, case ids repeat,
            images have no labels (folder layout), no cases are found, or the split names
            unknown cases.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder; check the path")
    meta_path = root / "dataset.json"
    modality: str | None = None
    if meta_path.is_file():
        meta = _load_json(meta_path)
        if not isinstance(meta, dict):
            raise DataError(f"{meta_path}: expected a JSON object")
        has_nn = [k for k in _NNUNET_KEYS if k in meta]
        if len(has_nn) == len(_NNUNET_KEYS):
            layout = "nnunet"
            cases, channels = _discover_nnunet(root, meta, meta_path)
        elif "training" in meta:
            layout = "msd"
            missing = [k for k in _MSD_KEYS if k not in meta]
            if missing:
                raise DataError(f"{meta_path}: MSD layout needs keys {list(_MSD_KEYS)}; missing {missing}")
            cases, channels = _discover_msd(root, meta, meta_path)
        elif any(k in meta for k in _NNUNET_ONLY_KEYS):
            missing = [k for k in _NNUNET_KEYS if k not in meta]
            raise DataError(
                f"{meta_path}: nnU-Net v2 layout needs keys {list(_NNUNET_KEYS)}; missing {missing} "
                "(or give an MSD 'training' list)"
            )
        else:
            raise DataError(
                f"{meta_path}: has neither the nnU-Net v2 keys {list(_NNUNET_KEYS)} nor the MSD keys "
                f"{list(_MSD_KEYS)}; found {sorted(meta)}"
            )
        labels = _parse_labels(meta["labels"], meta_path)
        modality = modality_from_names(meta.get("modality")) or modality_from_names(channels)
    else:
        layout = "folders"
        cases, channels, labels = _discover_folders(root)
    if not cases:
        raise DataError(f"{root}: no cases found; check imagesTr/ and dataset.json")
    _check_duplicates([c.case_id for c in cases], meta_path if meta_path.is_file() else root)
    cases.sort(key=lambda c: c.case_id)
    split = _read_split(root)
    if split is not None:
        check_split(split, [c.case_id for c in cases], root / "splits.json")
    return DatasetSource(root=root, layout=layout, cases=cases, labels=labels, channel_names=channels,
                         modality=modality, split=split)


def _unique_ids(stems: list[str]) -> list[str]:
    seen: Counter[str] = Counter()
    taken = set(stems)
    out = []
    for s in stems:
        seen[s] += 1
        if seen[s] == 1:
            out.append(s)
            continue
        n = seen[s]
        while f"{s}_{n}" in taken:
            n += 1
        seen[s] = n
        taken.add(f"{s}_{n}")
        out.append(f"{s}_{n}")
    return out


def _scan_folder(folder: Path) -> list[Path]:
    """Image files and DICOM series folders under ``folder`` (recursive, sorted)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        dicom_here = False
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            f = here / name
            suffix = image_suffix(name)
            if suffix in IMAGE_SUFFIXES:
                found.append(f)
            elif suffix in DICOM_SUFFIXES or ("." not in name and is_dicom_file(f)):
                dicom_here = True
        if dicom_here:
            found.append(here)
    return sorted(found)


def _json_entries(path: Path) -> list[tuple[Path, str | None]]:
    raw = _load_json(path)
    if isinstance(raw, dict):
        raw = raw.get("images") or raw.get("training") or raw.get("files")
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a list of paths or of {{\"image\": path}} objects")
    out: list[tuple[Path, str | None]] = []
    for i, entry in enumerate(raw):
        modality = None
        if isinstance(entry, str):
            p = entry
        elif isinstance(entry, dict):
            p = entry.get("image") or entry.get("file") or entry.get("path")
            modality = modality_from_names(entry.get("modality")) if entry.get("modality") else None
            if p is None:
                raise DataError(f"{path}: entry {i} ({entry!r}) has no 'image' path")
        else:
            raise DataError(f"{path}: entry {i} ({entry!r}) is neither a path nor an {{\"image\": path}} object")
        q = Path(p)
        out.append(((q if q.is_absolute() else path.parent / q), modality))
    return out


def discover_pool(source) -> list[CaseSource]:
    """Find the images of an unlabelled pool.

    Args:
        source: a folder (searched recursively for .nii, .nii.gz, .mgz, .nrrd, .mha, .mhd files
            and DICOM series folders), a glob pattern string, a ``.json`` file holding a list of
            paths or of ``{"image": path}`` objects (``"file"`` is accepted too, as is a
            per-entry ``"modality"``; relative paths are relative to the JSON file), a single
            image file, or a list of paths.

    Returns:
        One CaseSource per image (label None), ids from file names without extensions, made
        unique with ``_2``, ``_3``... suffixes, in sorted path order.

    Raises:
        DataError: nothing found, or listed files do not exist.
    """
    modalities: dict[Path, str | None] = {}
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        where = "the given list"
    else:
        s = str(source)
        p = Path(s)
        where = s
        if p.is_dir():
            paths = _scan_folder(p)
        elif p.is_file() and s.lower().endswith(".json"):
            entries = _json_entries(p)
            paths = [q for q, _ in entries]
            modalities = {q: m for q, m in entries}
        elif p.is_file():
            paths = [p]
        elif any(ch in s for ch in "*?["):
            paths = []
            for m in sorted(_glob.glob(s, recursive=True)):
                q = Path(m)
                if q.is_dir():
                    if any(is_dicom_file(f) for f in q.iterdir() if f.is_file()):
                        paths.append(q)
                elif image_suffix(q) in IMAGE_SUFFIXES or is_dicom_file(q):
                    paths.append(q)
        else:
            raise DataError(f"{s}: no such file or folder; pass a folder, a glob pattern or a .json list of images")
    missing = [str(q) for q in paths if not q.exists()]
    if missing:
        raise DataError(f"{where}: {len(missing)} listed image(s) do not exist: {missing[:5]}; fix the paths")
    if not paths:
        raise DataError(
            f"{where}: no images found (looked for .nii, .nii.gz, .mgz, .nrrd, .mha, .mhd files and DICOM "
            "series folders); check the path or pattern"
        )
    stems = [q.name if q.is_dir() else strip_image_suffix(q.name) for q in paths]
    ids = _unique_ids(stems)
    return [CaseSource(cid, [q], None, modalities.get(q)) for cid, q in zip(ids, paths)]


def make_split(case_ids, seed: int, test_fraction: float = 0.2) -> dict[str, list[str]]:
    """A seeded random train/test split, independent of the input order.

    Args:
        case_ids: the case ids to split.
        seed: random seed; the same ids and seed give the same split.
        test_fraction: share of cases in "test" (rounded; at least one when there are two or
            more cases and the fraction is > 0).

    Returns:
        ``{"train": sorted ids, "test": sorted ids}``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction {test_fraction} must be in [0, 1)")
    ids = sorted(set(str(c) for c in case_ids))
    rng = random.Random(seed)
    shuffled = list(ids)
    rng.shuffle(shuffled)
    n_test = int(round(len(ids) * test_fraction))
    if test_fraction > 0 and len(ids) >= 2:
        n_test = min(max(n_test, 1), len(ids) - 1)
    test = sorted(shuffled[:n_test])
    train = sorted(shuffled[n_test:])
    return {"train": train, "test": test}
