"""The prepared cache: preprocessed arrays on disk, written once, read many times.

Layout of a prepared folder (the nnU-Net preprocessed convention)::

    CASE.npy          image, float32, (C, X, Y, Z)
    CASE_seg.npy      label, uint8/uint16, (X, Y, Z)   (labelled data only)
    CASE.json         per-case metadata, written LAST: its presence marks the case complete
    manifest.json     written at the end of a run; describes the whole cache

With ``--cache-format blosc2`` the arrays are ``CASE.b2nd`` and ``CASE_seg.b2nd`` instead (``data/arrays.py``);
``manifest.json`` records the format (``array_format``; absent = ``npy``) and readers follow it.

Every file is written under a temporary name in the same folder and moved into place with
``os.replace``, so an interrupted run never leaves a half-written file under a real name; a
re-run redoes exactly the cases whose ``CASE.json`` is missing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from medpretrain.data.arrays import (
    DEFAULT_FORMAT, SUFFIX, array_settings, check_format, open_array, require_blosc2, save_array,
)
from medpretrain.data.datasets import CaseSource, check_split, discover_dataset, discover_pool, make_split
from medpretrain.atomic import atomic_write_json, check_writable_folder
from medpretrain.data.io import Image3D, read_header, read_image
from medpretrain.data.preprocess import Geometry, PreprocessConfig, default_max_voxels, memory_bytes, preprocess_case
from medpretrain.errors import CacheError, ConfigError, DataError, describe_os_error

FORMAT = "medpretrain-cache"
FORMAT_VERSION = 1
MAX_FOREGROUND_COORDS = 1000

log = logging.getLogger("medpretrain")


def _jsonable(obj):
    """Round trip through JSON so tuples/lists and int keys compare equal to a loaded manifest."""
    return json.loads(json.dumps(obj))


# --------------------------------------------------------------------------- per-case work


def _case_seed(seed: int, case_id: str) -> int:
    # Stable across processes and Python runs (unlike hash()). surrogateescape: a file name that is not valid
    # UTF-8 (its bytes held as surrogates) hashes as its bytes instead of failing.
    return (zlib.crc32(case_id.encode("utf-8", "surrogateescape")) ^ (seed * 2654435761)) & 0xFFFFFFFF


def _foreground_coords(label: np.ndarray, seed: int) -> dict[str, list[list[int]]]:
    flat = np.flatnonzero(label)
    if flat.size == 0:
        return {}
    values = label.reshape(-1)[flat]
    order = np.argsort(values, kind="stable")
    flat, values = flat[order], values[order]
    classes, starts = np.unique(values, return_index=True)
    ends = list(starts[1:]) + [values.size]
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[int]]] = {}
    for c, a, b in zip(classes, starts, ends):
        idx = flat[a:b]
        if idx.size > MAX_FOREGROUND_COORDS:
            idx = np.sort(rng.choice(idx, MAX_FOREGROUND_COORDS, replace=False))
        out[str(int(c))] = np.stack(np.unravel_index(idx, label.shape), axis=1).astype(int).tolist()
    return out


def _array_names(case_id: str, fmt: str) -> tuple[str, str]:
    """File names of a case's image and label arrays in a cache of array format ``fmt``."""
    return f"{case_id}{SUFFIX[fmt]}", f"{case_id}_seg{SUFFIX[fmt]}"


def _case_files(case_id: str, out_dir: Path) -> list[Path]:
    """The files a case owns in the cache (arrays of every format), the completion marker ``CASE.json`` first."""
    return [out_dir / f"{case_id}.json"] + [out_dir / n for fmt in SUFFIX for n in _array_names(case_id, fmt)]


def _stops_every_case(exc: OSError, out_dir: Path) -> bool:
    """True for an OS error that would fail every other case too (a full disk, a read-only cache folder):
    skipping case after case with the same error would hide it."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EROFS):
        return True
    return exc.errno in (errno.EACCES, errno.EPERM) and str(exc.filename or "").startswith(str(out_dir))


def _process_case(task: dict) -> dict:
    """Prepare and write one case. Runs in worker processes: takes and returns plain data.

    Returns ``{"case_id", "entry"}`` on success or ``{"case_id", "skip": {...}}`` for a bad case. Whatever goes
    wrong with one case (not only a ``DataError``) makes it a skip and removes its files, so one bad case never
    stops the others nor leaves ``CASE.npy`` without ``CASE.json``; only an error that every case would meet
    (no space left, a read-only cache) stops the run, as a CacheError.
    """
    out_dir = Path(task["out_dir"])
    try:
        result = _process_case_unguarded(task)
    except Exception as exc:
        _remove_case_files(task["case_id"], out_dir)
        if isinstance(exc, OSError) and _stops_every_case(exc, out_dir):
            raise CacheError(describe_os_error(exc)) from None
        if isinstance(exc, OSError):
            reason = describe_os_error(exc)
        else:
            reason = (f"{task['images'][0]}: unexpected {type(exc).__name__} while preparing case "
                      f"{task['case_id']!r}: {_one_line(exc)}; the other cases are prepared (check this case's "
                      "files, and report it if they look right)")
        return {"case_id": task["case_id"],
                "skip": {"case_id": task["case_id"], "file": str(task["images"][0]), "reason": reason}}
    if "skip" in result:
        _remove_case_files(task["case_id"], out_dir)  # stale files of an earlier version of the case
    return result


def _remove_case_files(case_id: str, out_dir: Path) -> None:
    for path in _case_files(case_id, out_dir):
        with contextlib.suppress(OSError):  # e.g. a name too long to exist at all
            path.unlink(missing_ok=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _process_case_unguarded(task: dict) -> dict:
    case_id = task["case_id"]
    images = [Path(p) for p in task["images"]]
    label_path = Path(task["label"]) if task["label"] else None
    out_dir = Path(task["out_dir"])
    cfg = PreprocessConfig(**task["cfg"])
    current_file = str(images[0])
    try:
        parts = []
        for p in images:
            current_file = str(p)
            parts.append(read_image(p))
        image = parts[0]
        if len(parts) > 1:
            for p, part in zip(images[1:], parts[1:]):
                if part.spatial_shape != image.spatial_shape or not np.allclose(part.affine, image.affine, atol=1e-2, rtol=1e-3):
                    raise DataError(
                        f"{p}: channel file does not lie on the grid of {images[0]} (shape {part.spatial_shape} vs "
                        f"{image.spatial_shape}); all channels of a case must share one voxel grid"
                    )
            image = Image3D(np.concatenate([q.array.astype(np.float32, copy=False) for q in parts], axis=0),
                            image.affine, image.path)
        current_file = str(images[0])
        expected = task.get("channels")
        if expected is not None and image.num_channels != expected:
            raise DataError(
                f"{images[0]}: has {image.num_channels} channel(s) but {expected} {'is' if expected == 1 else 'are'} "
                f"declared ({task.get('channel_source') or 'dataset'}); fix channel_names or the image"
            )
        label = None
        if label_path is not None:
            current_file = str(label_path)
            label = read_image(label_path)
        current_file = str(images[0])
        declared = set(task["declared_labels"]) if task["declared_labels"] is not None else None
        prepared = preprocess_case(image, label, cfg, tuple(task["spacing"]), task["modality"],
                                   declared_labels=declared, source=str(images[0]),
                                   label_values=task.get("label_values"))
    except DataError as exc:
        msg = str(exc)
        # Name the file the problem is in: the label when the message is about it.
        file = str(label_path) if label_path is not None and str(label_path) in msg else current_file
        return {"case_id": case_id, "skip": {"case_id": case_id, "file": file, "reason": msg}}

    fmt = task.get("array_format", DEFAULT_FORMAT)
    image_name, label_name = _array_names(case_id, fmt)
    save_array(out_dir / image_name, prepared.image, fmt)
    entry = {
        "shape": [int(s) for s in prepared.image.shape],
        "spacing": list(prepared.geometry.spacing),
        "modality": task["modality"],
        "geometry": prepared.geometry.to_dict(),
        "stats": prepared.stats,
        "classes_present": [],
        "foreground": {},
        "source_image": [str(p) for p in images],
        "source_label": str(label_path) if label_path is not None else None,
    }
    if prepared.label is not None:
        save_array(out_dir / label_name, prepared.label, fmt)
        fg = _foreground_coords(prepared.label, _case_seed(task["seed"], case_id))
        entry["foreground"] = fg
        entry["classes_present"] = sorted(int(c) for c in fg)
    record = {"case_id": case_id, "preprocess": task["preprocess"], "sources": _fingerprint(task),
              "seed": task["seed"], **entry}
    if task.get("label_values") is not None:  # only then: caches of consecutive ids stay as they were
        record["label_values"] = task["label_values"]
    if fmt != DEFAULT_FORMAT:  # only then: npy caches stay as they were
        record["array_format"] = fmt
    for other in SUFFIX:  # arrays of another format left by an interrupted run into this folder
        if other != fmt:
            for name in _array_names(case_id, other):
                with contextlib.suppress(OSError):
                    (out_dir / name).unlink(missing_ok=True)
    atomic_write_json(out_dir / f"{case_id}.json", _jsonable(record))  # last: marks the case complete
    return {"case_id": case_id, "entry": _jsonable(entry)}


def _fingerprint(task: dict) -> list[list]:
    """Size and modification time of every source file: a file fixed in place makes its case be redone."""
    paths = list(task["images"]) + ([task["label"]] if task["label"] else [])
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out.append([str(p), sum(f.stat().st_size for f in files), max((f.stat().st_mtime_ns for f in files), default=0)])
    return out


def _existing_entry(out_dir: Path, task: dict) -> dict | None:
    """The entry of an already complete case whose settings and sources match, else None."""
    case_id = task["case_id"]
    meta_path = out_dir / f"{case_id}.json"
    fmt = task.get("array_format", DEFAULT_FORMAT)
    image_name, label_name = _array_names(case_id, fmt)
    if not meta_path.is_file() or not (out_dir / image_name).is_file():
        return None
    if task["label"] and not (out_dir / label_name).is_file():
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("preprocess") != task["preprocess"]:
        return None
    if record.get("source_image") != [str(p) for p in task["images"]]:
        return None
    if record.get("source_label") != (str(task["label"]) if task["label"] else None):
        return None
    if record.get("seed") != task["seed"] or record.get("sources") != _fingerprint(task):
        return None
    if record.get("label_values") != task.get("label_values"):  # the label ids were renumbered otherwise
        return None
    if record.get("array_format", DEFAULT_FORMAT) != fmt:
        return None
    for key in ("case_id", "preprocess", "sources", "seed", "label_values", "array_format"):
        record.pop(key, None)
    return record


# --------------------------------------------------------------------------- resolution helpers


def _ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes ordered along R, A, S (what the prepared grid's spacing refers to)."""
    import nibabel.orientations as nio

    a = np.asarray(affine, dtype=np.float64)
    sp = np.linalg.norm(a[:3, :3], axis=0)
    ornt = nio.io_orientation(a)
    out = np.empty(3)
    for in_axis, (out_axis, _) in enumerate(ornt):
        out[int(out_axis)] = sp[in_axis]
    return out


def _scan_headers(cases: list[CaseSource]) -> tuple[dict[str, tuple[np.ndarray, int]], list[dict], dict[str, float]]:
    """Read every case's geometry cheaply; unreadable headers become skips. Also returns each case's field of
    view in mm^3 (what its voxel count at a target spacing follows from)."""
    info: dict[str, tuple[np.ndarray, int]] = {}
    volumes: dict[str, float] = {}
    skipped: list[dict] = []
    for case in cases:
        try:
            channels = 0
            spacing = None
            for p in case.images:
                shape, nch, affine = read_header(p)
                channels += nch
                if spacing is None:
                    spacing = _ras_spacing(affine)
                    volumes[case.case_id] = float(np.prod(shape, dtype=np.float64) * np.prod(spacing))
            info[case.case_id] = (spacing, channels)
        except DataError as exc:
            skipped.append({"case_id": case.case_id, "file": str(case.images[0]), "reason": str(exc)})
        except Exception as exc:  # one odd file must not stop the others
            skipped.append({"case_id": case.case_id, "file": str(case.images[0]),
                            "reason": f"cannot read {case.images[0]}: {_one_line(exc)}; is it a complete image file? "
                                      "(re-export or re-download it)"})
        if case.case_id not in info:
            volumes.pop(case.case_id, None)
    return info, skipped, volumes


def _check_voxel_budget(volumes: dict[str, float], cfg: PreprocessConfig, spacing, info, where) -> None:
    """Stop, before anything is written, when every case would be resampled to more voxels than fit in
    memory (a tiny --spacing would allocate hundreds of GB). With some cases over the budget those are skipped
    one by one (``preprocess_case``); with an explicit ``max_voxels`` every case is checked that way too."""
    if cfg.max_voxels is not None or not volumes:
        return
    budget = default_max_voxels()
    per_voxel = float(np.prod(spacing))
    counts = {cid: vol / per_voxel for cid, vol in volumes.items()}
    smallest = min(counts, key=counts.get)
    if counts[smallest] <= budget:
        return
    median = _median_spacing(info, where)
    raise DataError(
        f"{where}: at spacing {tuple(float(s) for s in spacing)} mm every case would have more voxels than fit in "
        f"memory (the smallest, {smallest}, about {counts[smallest]:.3g} voxels, {counts[smallest] * 4 / 1e9:.3g} GB "
        f"as float32; the limit is {budget:.3g} voxels for {memory_bytes() / 2**30:.0f} GiB of memory); choose a "
        f"coarser --spacing (the dataset's median is {median}) or pass --max-voxels"
    )


def _median_spacing(info: dict[str, tuple[np.ndarray, int]], where) -> tuple[float, float, float]:
    if not info:
        raise DataError(f"{where}: no readable image to compute the median spacing from; pass an explicit spacing")
    sp = np.median(np.stack([s for s, _ in info.values()]), axis=0)
    # Round away float noise from headers so that re-runs and subsets give the same grid.
    return tuple(float(round(v, 4)) for v in sp)  # type: ignore[return-value]


def _resolved_preprocess(cfg: PreprocessConfig, spacing, modality: str) -> dict:
    d = cfg.model_dump()
    d["spacing"] = [float(s) for s in spacing]
    d["modality"] = modality
    return _jsonable(d)


def _check_existing_manifest(out_dir: Path, preprocess: dict, kind: str, array_format: str = DEFAULT_FORMAT) -> None:
    path = out_dir / "manifest.json"
    if not path.is_file():
        return
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: cannot read the existing manifest ({exc}); delete {out_dir} or use a new --out") from exc
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("format") != FORMAT:
        raise CacheError(
            f"{out_dir}: holds a cache of format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"this version writes {FORMAT!r} version {FORMAT_VERSION}; delete {out_dir} or use a new --out"
        )
    if manifest.get("kind") != kind:
        raise CacheError(f"{out_dir}: holds a {manifest.get('kind')} cache, not a {kind} one; use a new --out or delete it")
    old = manifest.get("preprocess")
    if old != preprocess:
        diff = sorted(k for k in set(old or {}) | set(preprocess) if (old or {}).get(k) != preprocess.get(k))
        raise CacheError(
            f"{out_dir}: was prepared with different preprocessing settings (differ in {diff}); "
            "use a new --out or delete it to prepare again"
        )
    old_format = manifest.get("array_format", DEFAULT_FORMAT)
    if old_format != array_format:
        raise CacheError(
            f"{out_dir}: holds arrays stored as {old_format}, not {array_format}; re-run with --cache-format "
            f"{old_format}, or use a new --out (or delete it) to prepare as {array_format}"
        )


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not (enabled and sys.stderr.isatty()),
    )


def _run_tasks(tasks: list[dict], out_dir: Path, workers: int, strict: bool, progress: bool, label: str):
    """Run the tasks not already done; return (entries by case, skips)."""
    entries: dict[str, dict] = {}
    skipped: list[dict] = []
    todo = []
    for task in tasks:
        done = _existing_entry(out_dir, task)
        if done is not None:
            entries[task["case_id"]] = done
        else:
            todo.append(task)
    if len(entries):
        log.info("%d case(s) already prepared in %s, %d to do", len(entries), out_dir, len(todo))

    def handle(result: dict) -> None:
        if "skip" in result:
            if strict:
                raise DataError(result["skip"]["reason"])
            s = result["skip"]
            log.warning("SKIP %s: %s", s["case_id"], s["reason"])
            skipped.append(s)
        else:
            entries[result["case_id"]] = result["entry"]

    if workers > 1 and len(todo) > 1:
        # Workers are started (forked) before the progress bar starts its refresh thread.
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = [pool.submit(_process_case, t) for t in todo]
            try:
                with _progress(progress) as bar:
                    job = bar.add_task(label, total=len(todo))
                    for fut in as_completed(futures):
                        handle(fut.result())
                        bar.advance(job)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        with _progress(progress) as bar:
            job = bar.add_task(label, total=len(todo))
            for t in todo:
                handle(_process_case(t))
                bar.advance(job)
    return entries, skipped


def _log_skipped(skipped: list[dict], out_dir: Path) -> None:
    if skipped:
        log.warning(
            "%d case(s) skipped while preparing %s: %s (details in manifest.json 'skipped')",
            len(skipped), out_dir, ", ".join(s["case_id"] for s in skipped),
        )


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_json(out_dir / "manifest.json", _jsonable(manifest))


@contextlib.contextmanager
def cache_folder_lock(out_dir: Path):
    """Hold an exclusive lock on a cache folder while preparing into it, as ``run_folder_lock`` does for a run
    folder: two ``prepare`` runs into one folder would each write arrays and then a manifest of their own, and
    leave a cache whose arrays disagree with its manifest. The lock is taken on the folder itself (no lock file
    in the cache) and the OS releases it when the process dies, however it dies. Where ``fcntl`` is missing
    (Windows) the folder is not locked.

    Raises:
        CacheError: another process holds the folder.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(
                f"{out_dir} is in use by another prepare process; wait for it to finish or stop it, then re-run "
                "(two processes preparing one folder would leave a cache whose arrays disagree with its manifest)"
            ) from None
        yield
    finally:
        os.close(fd)


def _check_workers(workers: int) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers {workers!r} must be a whole number >= 1 (1 = prepare in this process)")


def _refuse_if_nothing_prepared(entries: dict, skipped: list[dict], where) -> None:
    """A cache without a single case is no result: stop (no manifest, so nothing downstream mistakes the
    folder for prepared data) instead of reporting success."""
    if entries:
        return
    if not skipped:
        raise DataError(f"{where}: no case to prepare; check the dataset")
    first = skipped[0]
    raise DataError(
        f"{where}: none of the {len(skipped)} case(s) could be prepared, all were skipped (reasons above; the first, "
        f"{first['case_id']}: {first['reason']}); fix them and re-run"
    )


# --------------------------------------------------------------------------- public API


def prepare_dataset(
    dataset_dir,
    out_dir,
    cfg: PreprocessConfig,
    workers: int = 1,
    strict: bool = False,
    seed: int = 0,
    progress: bool = True,
    case_ids: list[str] | None = None,
    cache_format: str = DEFAULT_FORMAT,
) -> "PreparedData":
    """Preprocess a labelled dataset into a prepared cache.

    Args:
        dataset_dir: nnU-Net v2 raw, MSD or images/ + labels/ folder.
        out_dir: the cache folder (created; re-running continues where a run stopped).
        cfg: preprocessing settings; ``spacing=None`` uses the median spacing of all cases
            of the dataset, ``modality=None`` the dataset's (else "MR").
        workers: processes to use (1 = in this process).
        strict: raise the first bad case's DataError instead of skipping it.
        seed: seed of the train/test split (when the dataset has none) and of the
            foreground coordinate sampling.
        progress: show a progress bar (only on a terminal).
        case_ids: prepare only these cases (None = all).
        cache_format: how arrays are stored: ``npy`` (memory-mapped, no decode) or ``blosc2`` (compressed;
            needs the ``blosc2`` package). Recorded in the manifest; readers follow it.

    Returns:
        The opened cache.

    Raises:
        DataError: the dataset cannot be read, names unknown cases, or (strict) a case is bad.
        CacheError: ``out_dir`` holds a cache with other settings or of another format.
    """
    out_dir = check_writable_folder(out_dir)
    _check_workers(workers)
    check_format(cache_format)
    ds = discover_dataset(dataset_dir)
    cases = ds.cases
    if case_ids is not None:
        known = {c.case_id for c in cases}
        unknown = [c for c in case_ids if c not in known]
        if unknown:
            raise DataError(f"{dataset_dir}: case ids {unknown[:5]} are not in the dataset; available e.g. {sorted(known)[:5]}")
        wanted = set(case_ids)
        cases = [c for c in cases if c.case_id in wanted]
    modality = cfg.modality or ds.modality or "MR"
    # Headers of all cases, even with a subset selected, so that the median spacing (and with
    # it the cache's settings) does not depend on which cases were picked.
    info, header_skips, volumes = _scan_headers(ds.cases)
    spacing = tuple(cfg.spacing) if cfg.spacing is not None else _median_spacing(info, dataset_dir)
    preprocess = _resolved_preprocess(cfg, spacing, modality)
    _check_voxel_budget({c.case_id: volumes[c.case_id] for c in cases if c.case_id in volumes}, cfg, spacing, info,
                        dataset_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with cache_folder_lock(out_dir):
        _check_existing_manifest(out_dir, preprocess, "labelled", cache_format)

        selected = {c.case_id for c in cases}
        skipped = [s for s in header_skips if s["case_id"] in selected]
        if strict and skipped:
            raise DataError(skipped[0]["reason"])
        for s in skipped:
            log.warning("SKIP %s: %s", s["case_id"], s["reason"])
        bad = {s["case_id"] for s in skipped}
        declared_labels = sorted(ds.labels)
        # Label ids with gaps (0, 1, 5) are renumbered 0..K-1 for training (a network has K outputs) and mapped
        # back by predict; consecutive ids are left as they are.
        label_values = declared_labels if declared_labels != list(range(len(declared_labels))) else None
        tasks = [
            {
                "case_id": c.case_id, "images": [str(Path(p).resolve()) for p in c.images],
                "label": str(Path(c.label).resolve()) if c.label else None,
                "out_dir": str(out_dir), "cfg": cfg.model_dump(), "spacing": list(spacing), "modality": modality,
                "declared_labels": declared_labels, "channels": len(ds.channel_names),
                "channel_source": f"channel_names in {Path(dataset_dir) / 'dataset.json'}" if ds.layout != "folders" else "the other cases",
                "preprocess": preprocess, "seed": seed, "label_values": label_values, "array_format": cache_format,
            }
            for c in cases if c.case_id not in bad
        ]
        entries, run_skips = _run_tasks(tasks, out_dir, workers, strict, progress, f"prepare {Path(dataset_dir).name}")
        skipped += run_skips
        _refuse_if_nothing_prepared(entries, skipped, dataset_dir)

        if ds.split is not None:
            check_split(ds.split, ds.case_ids, Path(dataset_dir) / "splits.json")
            split = {k: [c for c in v if c in selected] for k, v in ds.split.items()}
        else:
            split = make_split(sorted(selected), seed)
        split = {k: [c for c in v if c in entries] for k, v in split.items()}

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "labelled",
            "source": str(Path(dataset_dir).resolve()),
            "layout": ds.layout,
            "preprocess": preprocess,
            "array_format": cache_format,
            "arrays": array_settings(cache_format),
            "labels": {str(i): ds.labels[v] for i, v in enumerate(declared_labels)},
            "channels": list(ds.channel_names),
            "split": split,
            "cases": {cid: entries[cid] for cid in sorted(entries)},
            "skipped": sorted(skipped, key=lambda s: s["case_id"]),
        }
        if label_values is not None:
            manifest["label_values"] = label_values  # training class i is label id label_values[i] on disk
        _write_manifest(out_dir, manifest)
        _log_skipped(skipped, out_dir)
    data = PreparedData(out_dir)
    # nnU-Net's dataset fingerprint, for `medpretrain plan` (spacings, shapes, intensities, classes, objects).
    from medpretrain.planning import write_fingerprint

    write_fingerprint(data)
    return data


def prepare_pool(
    source,
    out_dir,
    cfg: PreprocessConfig,
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
    cache_format: str = DEFAULT_FORMAT,
) -> "PreparedData":
    """Preprocess an unlabelled pool of images into a prepared cache (no ``_seg.npy`` files).

    Args:
        source: a folder, glob pattern or .json list of images (see
            :func:`~medpretrain.data.datasets.discover_pool`).
        out_dir: the cache folder (created; re-running continues where a run stopped).
        cfg: preprocessing settings; ``spacing=None`` uses the median spacing of the pool.
            ``modality=None`` uses each entry's modality from a .json list when given,
            else "MR".
        workers: processes to use (1 = in this process).
        strict: raise the first bad image's DataError instead of skipping it.
        progress: show a progress bar (only on a terminal).
        cache_format: ``npy`` or ``blosc2``, as for :func:`prepare_dataset`.

    Returns:
        The opened cache; its "train" split holds every prepared image, "test" is empty.

    Raises:
        DataError: nothing found, or (strict) an image is bad.
        CacheError: ``out_dir`` holds a cache with other settings or of another format.
    """
    out_dir = check_writable_folder(out_dir)
    _check_workers(workers)
    check_format(cache_format)
    cases = discover_pool(source)
    info, skipped, volumes = _scan_headers(cases)
    if strict and skipped:
        raise DataError(skipped[0]["reason"])
    for s in skipped:
        log.warning("SKIP %s: %s", s["case_id"], s["reason"])
    spacing = tuple(cfg.spacing) if cfg.spacing is not None else _median_spacing(info, source)
    modality = cfg.modality or "MR"
    preprocess = _resolved_preprocess(cfg, spacing, modality)
    _check_voxel_budget(volumes, cfg, spacing, info, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    with cache_folder_lock(out_dir):
        _check_existing_manifest(out_dir, preprocess, "pool", cache_format)

        # A pretraining network has one input width: images with another channel count than the
        # most common one are skipped rather than silently reduced.
        counts = Counter(ch for _, ch in info.values())
        channels = min(counts, key=lambda c: (-counts[c], c)) if counts else 1
        tasks = [
            {
                "case_id": c.case_id, "images": [str(Path(p).resolve()) for p in c.images], "label": None,
                "out_dir": str(out_dir), "cfg": cfg.model_dump(), "spacing": list(spacing),
                "modality": cfg.modality or c.modality or modality,
                "declared_labels": None, "channels": channels, "channel_source": "the pool's most common channel count",
                "preprocess": preprocess, "seed": 0, "array_format": cache_format,
            }
            for c in cases if c.case_id in info
        ]
        entries, run_skips = _run_tasks(tasks, out_dir, workers, strict, progress, "prepare pool")
        skipped += run_skips
        _refuse_if_nothing_prepared(entries, skipped, source)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "pool",
            "source": str(source if isinstance(source, (list, tuple)) else Path(str(source)).resolve()),
            "preprocess": preprocess,
            "array_format": cache_format,
            "arrays": array_settings(cache_format),
            "labels": {},
            "channels": [f"channel_{i}" for i in range(channels)],
            "split": {"train": sorted(entries), "test": []},
            "cases": {cid: entries[cid] for cid in sorted(entries)},
            "skipped": sorted(skipped, key=lambda s: s["case_id"]),
        }
        _write_manifest(out_dir, manifest)
        _log_skipped(skipped, out_dir)
    data = PreparedData(out_dir)
    # nnU-Net's dataset fingerprint, for `medpretrain plan` (spacings, shapes, intensities, classes, objects).
    from medpretrain.planning import write_fingerprint

    write_fingerprint(data)
    return data


def prepare(dataset=None, pool=None, out="prepared", cfg: PreprocessConfig | None = None, workers: int = 1,
            strict: bool = False, seed: int = 0, progress: bool = True,
            cache_format: str = DEFAULT_FORMAT) -> "PreparedData":
    """Prepare a labelled dataset (``dataset``) or an unlabelled pool (``pool``) into a cache at ``out``.

    Lives here rather than in ``medpretrain.api`` so that ``medpretrain prepare`` starts without
    importing torch/Lightning (seconds of start-up it does not need); the API re-exports it.
    """
    cfg = cfg or PreprocessConfig()
    if (dataset is None) == (pool is None):
        raise DataError("give exactly one of --dataset DIR (labelled) or --pool DIR|GLOB|LIST.json (unlabelled)")
    if dataset is not None:
        return prepare_dataset(dataset, out, cfg, workers=workers, strict=strict, seed=seed, progress=progress,
                               cache_format=cache_format)
    return prepare_pool(pool, out, cfg, workers=workers, strict=strict, progress=progress, cache_format=cache_format)


class PreparedData:
    """A prepared cache opened for reading (validated on open).

    Args:
        root: the prepared folder.

    Raises:
        CacheError: no manifest, another format version, or listed files missing.
    """

    def __init__(self, root):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise CacheError(
                f"no manifest.json in {self.root}: run `medpretrain prepare ...` first "
                "(or it was interrupted: re-run it)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                self.manifest: dict = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise CacheError(f"{path}: cannot read the manifest ({exc}); re-run `medpretrain prepare`") from exc
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{self.root}: cache format {self.manifest.get('format')!r} version "
                f"{self.manifest.get('format_version')!r} is not {FORMAT!r} version {FORMAT_VERSION} "
                "(written by another medpretrain version); re-run `medpretrain prepare` into a new folder"
            )
        self.kind: str = self.manifest.get("kind", "labelled")
        # How the arrays are stored (data/arrays.py); caches written before the option existed are npy.
        self.array_format: str = self.manifest.get("array_format", DEFAULT_FORMAT)
        if self.array_format not in SUFFIX:
            raise CacheError(
                f"{self.root}: arrays stored as {self.array_format!r}, which this medpretrain version cannot read "
                f"(it reads {', '.join(SUFFIX)}); upgrade medpretrain or re-run `medpretrain prepare` into a new folder"
            )
        if self.array_format == "blosc2":
            require_blosc2(self.root)  # now, as one line, rather than in a DataLoader worker
        missing = []
        for cid in self.manifest.get("cases", {}):
            image_name, label_name = _array_names(cid, self.array_format)
            needed = [image_name, f"{cid}.json"] + ([label_name] if self.kind == "labelled" else [])
            missing += [n for n in needed if not (self.root / n).is_file()]
        if missing:
            raise CacheError(
                f"{self.root}: {len(missing)} file(s) listed in manifest.json are missing ({', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}); re-run `medpretrain prepare` with the same --out to redo them"
            )

    @property
    def case_ids(self) -> list[str]:
        """All prepared case ids, sorted."""
        return sorted(self.manifest["cases"])

    @property
    def labels(self) -> dict[int, str]:
        """Class id -> name, including 0 (empty for a pool)."""
        return {int(k): v for k, v in self.manifest.get("labels", {}).items()}

    @property
    def num_classes(self) -> int:
        """Number of classes including background (0 for a pool)."""
        return len(self.labels)

    @property
    def label_values(self) -> list[int] | None:
        """The label id on disk of each training class ``0..K-1`` when the dataset's ids have gaps (``[0, 1, 5]``:
        class 2 is label 5), else None (class i is label i)."""
        values = self.manifest.get("label_values")
        return [int(v) for v in values] if values is not None else None

    @property
    def in_channels(self) -> int:
        """Number of image channels."""
        return len(self.manifest["channels"])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) of the prepared grid."""
        return tuple(float(s) for s in self.manifest["preprocess"]["spacing"])  # type: ignore[return-value]

    @property
    def preprocess_config(self) -> PreprocessConfig:
        """The settings the cache was prepared with (spacing and modality resolved)."""
        return PreprocessConfig(**self.manifest["preprocess"])

    def split(self, name: str) -> list[str]:
        """The case ids of a split.

        Args:
            name: "train" or "test".

        Raises:
            CacheError: unknown split name.
        """
        splits = self.manifest.get("split") or {}
        if name not in splits:
            raise CacheError(f"{self.root}: no split {name!r}; available splits: {sorted(splits)}")
        return list(splits[name])

    def _check_case(self, case_id: str) -> None:
        if case_id not in self.manifest["cases"]:
            raise CacheError(
                f"{self.root}: case {case_id!r} is not in this cache ({len(self.manifest['cases'])} cases, "
                f"e.g. {self.case_ids[:3]}); was it skipped? see manifest.json 'skipped'"
            )

    def image(self, case_id: str, mmap: bool = True) -> np.ndarray:
        """The prepared image ``(C, X, Y, Z)`` float32.

        Args:
            case_id: the case.
            mmap: open the file read-only without loading it (``np.memmap``; for a blosc2 cache a
                :class:`~medpretrain.data.arrays.CompressedArray`, which slices like an array and decodes only
                the blocks a slice touches) instead of loading it whole.
        """
        self._check_case(case_id)
        return open_array(self.root / _array_names(case_id, self.array_format)[0], self.array_format, mmap)

    def label(self, case_id: str, mmap: bool = True) -> np.ndarray:
        """The prepared label map ``(X, Y, Z)`` uint8/uint16.

        Args:
            case_id: the case.
            mmap: open the file read-only without loading it, as for :meth:`image`.

        Raises:
            CacheError: a pool cache has no labels.
        """
        self._check_case(case_id)
        if self.kind != "labelled":
            raise CacheError(f"{self.root}: is an unlabelled {self.kind} cache; it has no labels")
        return open_array(self.root / _array_names(case_id, self.array_format)[1], self.array_format, mmap)

    def case(self, case_id: str) -> dict:
        """The manifest entry of a case (shape, spacing, geometry, stats, foreground, sources).

        Args:
            case_id: the case.
        """
        self._check_case(case_id)
        return self.manifest["cases"][case_id]

    def geometry(self, case_id: str) -> Geometry:
        """The case's :class:`Geometry` (to map predictions back to the source file).

        Args:
            case_id: the case.
        """
        return Geometry.from_dict(self.case(case_id)["geometry"])

    def __len__(self) -> int:
        return len(self.manifest["cases"])

    def __repr__(self) -> str:
        return f"PreparedData({str(self.root)!r}, kind={self.kind!r}, cases={len(self)})"
