"""nnU-Net v2's own scratch training as a yardstick (``medpretrain nnunet-scratch``, the benchmark's
``nnunet-scratch`` arm).

For a prepared labelled dataset of ours, this runs nnU-Net v2 itself (its fingerprint, planning, preprocessing,
trainer and predictor) on the labelled subset our ``finetune --n-labeled N --seed S`` trains on, with a fixed short
budget, in a private nnU-Net tree under the run folder:

1. ``RUN/nnunet/raw/Dataset999_medpretrain``: the N labelled cases (``imagesTr``/``labelsTr``) and the prepared
   test cases (``imagesTs``), as symbolic links to the dataset's original files in nnU-Net's naming
   (``CASE_0000.nii.gz``); NIfTI copies made by our reader where a source is not one ``.nii.gz`` per channel, and
   renumbered label maps where the label ids have gaps.
2. nnU-Net's fingerprint extraction, ``ExperimentPlanner`` (default ``nnUNetPlans``, PlainConvUNet) with a small
   GPU-memory target, which sizes the patch (and batch) for a CPU, and its preprocessing of ``3d_fullres``.
3. ``nnUNetTrainerBudget`` (``interop.nnunet_trainer``) on ``torch.device("cpu")``, fold ``all`` (every
   labelled case trains), seeded, for ``iterations`` steps or ``max_seconds`` of training.
4. ``nnUNetPredictor`` initialised with the trained network (its sliding window: tile step 0.5, Gaussian
   weighting, mirroring over the axes the trainer allows), on the test cases: ``RUN/predictions/CASE.nii.gz``, in
   each test image's original geometry, as nnU-Net exports them.

``medpretrain evaluate --run RUN --data PREPARED`` then scores those label maps with our metric code on our
prepared grid: each prediction is mapped into the case's prepared grid with exactly the steps ``prepare`` applied
to its ground truth (``data.preprocess.label_to_prepared``: reorientation, resampling with the cache's label
interpolation, crop), so nnU-Net's and our runs are compared on the same voxels; a prediction equal to the
original label map scores Dice 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from medpretrain.atomic import atomic_write_json, atomic_write_text, check_writable_folder
from medpretrain.data.cache import PreparedData
from medpretrain.errors import CacheError, ConfigError, DataError

log = logging.getLogger("medpretrain")

ARM = "nnunet-scratch"
RUN_KIND = "nnunet-scratch"
DATASET_ID = 999
DATASET_NAME = f"Dataset{DATASET_ID:03d}_medpretrain"
CONFIGURATION = "3d_fullres"
FOLD = "all"
FILE_ENDING = ".nii.gz"
PREDICTIONS = "predictions"
# nnU-Net's planner sizes the 3d_fullres patch (and batch) so that its estimate of the network's feature maps fits
# this many GB of GPU memory (its default: 8). On la2018 at 1.25 mm, 0.25 GB plans 28x48x56 voxels at batch 2 with
# 4 stages, the voxels per patch of our CPU budget's 48x48x32, ~5 s per iteration on one thread; 1 GB plans 48x64x96
# with 5 stages, ~36 s (docs/nnunet.md).
DEFAULT_GPU_MEMORY_TARGET_GB = 0.25
INSTALL_HINT = ("pip install 'medpretrain[nnunet]' (to keep an installed torch: pip install --no-deps nnunetv2 and "
                "the packages docs/nnunet.md lists)")
# Settings that change the result (a finished run with other values is another run); workers only change speed.
_SETTINGS = ("data", "n_labeled", "fraction", "seed", "iterations", "max_seconds", "gpu_memory_target_gb",
             "mirroring", "validation_cases", "validation_seed")


def require_nnunet() -> None:
    """ConfigError naming the install command when nnunetv2 or one of the packages its planning, preprocessing,
    training and prediction import is missing."""
    try:
        import nnunetv2  # noqa: F401
        import nnunetv2.experiment_planning.plan_and_preprocess_api  # noqa: F401
        import nnunetv2.inference.predict_from_raw_data  # noqa: F401
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer  # noqa: F401
    except ImportError as exc:
        missing = (getattr(exc, "name", None) or str(exc)).split(".")[0]
        raise ConfigError(f"nnunet-scratch runs nnU-Net v2 itself, and the package {missing!r} it needs is not "
                          f"installed: {INSTALL_HINT}") from None


@contextlib.contextmanager
def nnunet_environment(root: Path, workers: int):
    """nnU-Net's folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) under ``root``, its
    augmentation worker count, no ``torch.compile``; the previous values are restored afterwards. nnunetv2 reads
    these variables when it uses a path, so they apply to modules imported earlier too."""
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or _torch_threads())
    values = {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_n_proc_DA": str(workers),
        "nnUNet_compile": "false",
        # read once, when nnunetv2.configuration is first imported: the predictor's thread cap
        "nnUNet_def_n_proc": str(threads),
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nnunetv2")
    except PackageNotFoundError:  # pragma: no cover - imported from a source tree
        return "unknown"


# --- the subset and the raw dataset ----------------------------------------------------------------------------


def labelled_cases(data: PreparedData, seed: int, n_labeled: int | None, fraction: float | None,
                   validation_cases: int = 0, validation_seed: int = 0) -> tuple[list[str], list[str]]:
    """``(labelled subset, validation cases)``: exactly the cases ``finetune`` with the same ``--n-labeled`` (or
    ``--fraction``), ``--seed`` and ``validation_cases``/``validation_seed`` trains on (the same functions)."""
    from medpretrain.engine.finetune import labeled_subset, validation_split

    if not data.split("train"):
        raise CacheError(f"{data.root}: the train split holds no prepared case; re-run `medpretrain prepare`")
    validation, trainable = validation_split(data.split("train"), validation_cases, validation_seed)
    return labeled_subset(trainable, seed, n_labeled, fraction), validation


def _channel_names(data: PreparedData) -> dict[str, str]:
    """nnU-Net's ``channel_names``: ``CT`` selects its CT normalisation (dataset percentiles), any other name its
    per-image z-score; the modality the data were prepared as decides, as it decided ours."""
    modality = data.manifest["preprocess"].get("modality")
    names = {}
    for i, name in enumerate(data.manifest["channels"]):
        if modality == "CT":
            names[str(i)] = "CT"
        else:
            names[str(i)] = "MR" if str(name).strip().lower() in ("ct", "") else str(name)
    return names


def _link_or_copy_images(data: PreparedData, cid: str, folder: Path) -> list[Path]:
    """The case's channel files in ``folder`` as ``CID_000c.nii.gz``: symbolic links to the original files when they
    are one ``.nii.gz`` per channel, else NIfTI copies written from our reader (4D files, other formats)."""
    from medpretrain.data.io import read_image, write_nifti

    sources = [Path(p) for p in data.case(cid)["source_image"]]
    targets = [folder / f"{cid}_{c:04d}{FILE_ENDING}" for c in range(data.in_channels)]
    folder.mkdir(parents=True, exist_ok=True)
    if len(sources) == data.in_channels and all(s.name.lower().endswith(FILE_ENDING) for s in sources):
        for s, t in zip(sources, targets):
            t.unlink(missing_ok=True)
            t.symlink_to(s.resolve())
        return targets
    arrays = []
    for s in sources:
        img = read_image(s)
        arrays += [(a, img.affine) for a in img.array]
    if len(arrays) != data.in_channels:
        raise DataError(f"{sources[0]}: {len(arrays)} channel(s), the prepared data have {data.in_channels}")
    for (array, affine), t in zip(arrays, targets):
        write_nifti(array, affine, t)
    return targets


def _label_file(data: PreparedData, cid: str, folder: Path) -> Path:
    """The case's label map in ``folder`` as ``CID.nii.gz``: a symbolic link to the original, or a NIfTI of the
    training classes ``0..K-1`` when the dataset's label ids have gaps or the file is not ``.nii.gz``."""
    from medpretrain.data.io import read_image, write_nifti
    from medpretrain.data.preprocess import renumber_labels

    source = data.case(cid).get("source_label")
    if not source:
        raise DataError(f"{data.root}: case {cid} has no source label file in the manifest")
    source = Path(source)
    target = folder / f"{cid}{FILE_ENDING}"
    folder.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    if data.label_values is None and source.name.lower().endswith(FILE_ENDING):
        target.symlink_to(source.resolve())
        return target
    img = read_image(source)
    label = np.rint(np.asarray(img.array[0])).astype(np.int64)
    if data.label_values is not None:
        label = renumber_labels(label, data.label_values)
    write_nifti(label, img.affine, target)
    return target


def write_raw_dataset(data: PreparedData, raw_root: Path, train_cases: list[str], test_cases: list[str]) -> Path:
    """nnU-Net's raw dataset folder ``raw_root/Dataset999_medpretrain`` with ``train_cases`` (images and labels) and
    ``test_cases`` (images, ``imagesTs``) and its ``dataset.json``; returns the folder."""
    folder = raw_root / DATASET_NAME
    if folder.exists():
        shutil.rmtree(folder)
    for cid in train_cases:
        _link_or_copy_images(data, cid, folder / "imagesTr")
        _label_file(data, cid, folder / "labelsTr")
    for cid in test_cases:
        _link_or_copy_images(data, cid, folder / "imagesTs")
    # nnU-Net requires label 0 to be named "background"; our names of the others are kept (distinct by construction
    # of a labels map, but checked: nnU-Net's name -> id map would silently merge two equal names).
    labels = {("background" if int(i) == 0 else name): int(i) for i, name in sorted(data.labels.items())}
    if len(labels) != len(data.labels):
        raise ConfigError(f"{data.root}: the manifest's labels {data.labels} name two classes alike; nnU-Net's "
                          "dataset.json maps names to ids, so give every class its own name (re-run prepare)")
    atomic_write_json(folder / "dataset.json", {
        "name": "medpretrain",
        "description": f"labelled subset of {data.root} (medpretrain nnunet-scratch)",
        "channel_names": _channel_names(data),
        "labels": labels,
        "numTraining": len(train_cases),
        "file_ending": FILE_ENDING,
    })
    return folder


# --- nnU-Net's planning, training and prediction ---------------------------------------------------------------


def _plan_and_preprocess(gpu_memory_target_gb: float) -> tuple[dict, str, dict]:
    """Fingerprint, plan (3d_fullres with ``gpu_memory_target_gb``) and preprocess with nnU-Net's own API, one
    process each; returns ``(plans, plans identifier, seconds per stage)``."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset, plan_experiment_dataset, preprocess_dataset,
    )

    seconds = {}
    t = time.perf_counter()
    extract_fingerprint_dataset(DATASET_ID, num_processes=1, check_dataset_integrity=False, clean=True,
                                verbose=False, show_progress_bar=False)
    seconds["fingerprint_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    # The planner sets torch's thread count to nnUNet_n_proc_DA while it sizes networks, which 0 (augmentation in
    # the training process) would break.
    workers = os.environ.get("nnUNet_n_proc_DA")
    if workers == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        plans, identifier = plan_experiment_dataset(DATASET_ID, ExperimentPlanner,
                                                    gpu_memory_target_in_gb=float(gpu_memory_target_gb))
    finally:
        if workers is not None:
            os.environ["nnUNet_n_proc_DA"] = workers
    seconds["planning_s"] = round(time.perf_counter() - t, 2)
    if CONFIGURATION not in plans["configurations"]:
        raise DataError(f"nnU-Net planned no {CONFIGURATION} configuration for these cases (2D data?); "
                        f"configurations: {', '.join(plans['configurations'])}")
    t = time.perf_counter()
    preprocess_dataset(DATASET_ID, identifier, configurations=[CONFIGURATION], num_processes=[1], verbose=False,
                       show_progress_bar=False)
    seconds["preprocessing_s"] = round(time.perf_counter() - t, 2)
    return plans, identifier, seconds


def _plans_summary(plans: dict, identifier: str, gpu_memory_target_gb: float, n_parameters: int) -> dict[str, Any]:
    config = plans["configurations"][CONFIGURATION]
    arch = config["architecture"]
    kwargs = arch["arch_kwargs"]
    return {
        "plans": identifier,
        "planner": plans.get("experiment_planner_used"),
        "configuration": CONFIGURATION,
        "gpu_memory_target_gb": float(gpu_memory_target_gb),
        "axis_note": "spacing and patch in nnU-Net's array order after its transpose_forward "
                     f"{plans.get('transpose_forward')} (for NIfTI read by SimpleITK: z, y, x)",
        "spacing": [float(s) for s in config["spacing"]],
        "patch_size": [int(p) for p in config["patch_size"]],
        "batch_size": int(config["batch_size"]),
        "batch_dice": bool(config.get("batch_dice", False)),
        "normalization_schemes": config.get("normalization_schemes"),
        "median_image_size_in_voxels": [float(s) for s in config.get("median_image_size_in_voxels", [])],
        "network": {
            "class": arch["network_class_name"],
            "n_stages": kwargs.get("n_stages"),
            "features_per_stage": list(kwargs.get("features_per_stage", [])),
            "strides": kwargs.get("strides"),
            "kernel_sizes": kwargs.get("kernel_sizes"),
            "n_conv_per_stage": kwargs.get("n_conv_per_stage"),
            "parameters": n_parameters,
        },
    }


def _write_curve(run_dir: Path, history: list[tuple[int, float, float, float]]) -> None:
    """The training loss and learning rate per iteration, in the CSV layout ``evaluate`` plots."""
    lines = ["step,train/loss,train/lr,seconds"] + [f"{i},{loss:.6f},{lr:.6g},{s:.3f}" for i, s, loss, lr in history]
    atomic_write_text(run_dir / "logs" / "csv" / "metrics.csv", "\n".join(lines) + "\n")


def _same_settings(old: dict, new: dict) -> bool:
    return all(json.dumps(old.get(k), sort_keys=True) == json.dumps(new.get(k), sort_keys=True) for k in _SETTINGS)


def is_finished(run: str | Path) -> bool:
    """Whether ``run`` holds a finished nnunet-scratch run (its predictions written)."""
    path = Path(run) / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("kind") == RUN_KIND and bool(info.get("finished"))


def budget_from_run(run: str | Path) -> float:
    """The training wall time (s) a finished run of ours recorded (``run.json`` ``training.wall_time_s``): the
    budget that gives nnU-Net the same training time."""
    path = Path(run) / "run.json"
    try:
        training = json.loads(path.read_text(encoding="utf-8"))["training"]
        seconds = float(training["wall_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"--max-seconds-from {run}: no finished training there ({path} records no "
                          "training.wall_time_s); pass a finished finetune run folder, or --max-seconds") from None
    if training.get("steps_this_session", training.get("steps_done")) != training.get("steps_done"):
        # A resumed run records the time of its last session only; its steps say how much that covers.
        raise ConfigError(f"--max-seconds-from {run}: {path} was resumed (training.steps_this_session "
                          f"{training.get('steps_this_session')} of steps_done {training.get('steps_done')}), so its "
                          "wall_time_s is not the whole training; pass --max-seconds with the full time instead")
    if seconds <= 0:
        raise ConfigError(f"--max-seconds-from {run}: {path} records a wall time of {seconds} s; pass --max-seconds")
    return seconds


def nnunet_scratch(
    data: str | Path,
    out: str | Path,
    *,
    n_labeled: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    iterations: int | None = None,
    max_seconds: float | None = None,
    gpu_memory_target_gb: float = DEFAULT_GPU_MEMORY_TARGET_GB,
    workers: int = 1,
    mirroring: bool = True,
    validation_cases: int = 0,
    validation_seed: int = 0,
    budget_source: str | None = None,
) -> Path:
    """Plan, preprocess, train and predict with nnU-Net v2 on our labelled subset; returns the run folder.

    Args:
        data: prepared labelled data (``prepare --dataset``); the source files it lists are what nnU-Net reads.
        out: the run folder: ``run.json``, ``predictions/`` (test cases, original geometry), ``nnunet/`` (nnU-Net's
            raw, preprocessed and results trees, with ``checkpoint_final.pth``), ``nnunet.log`` (nnU-Net's output),
            ``logs/csv/metrics.csv`` (loss and lr per iteration).
        n_labeled, fraction: the labelled-set size (or fraction of the training cases), as ``finetune`` takes it.
        seed: seed of the labelled subset (as ``finetune``), of nnU-Net's initialisation and of its sampling and
            augmentation (its augmentation processes too).
        iterations, max_seconds: the budget, exactly one: optimizer steps, or seconds of training.
        gpu_memory_target_gb: nnU-Net's planner target (it sizes the patch and batch); small for a CPU.
        workers: nnU-Net's data-augmentation processes (0: in the training process).
        mirroring: nnU-Net's test-time mirroring (its default, on); off makes prediction 8x cheaper in 3D.
        validation_cases, validation_seed: training cases set aside as ``finetune``'s ``validation_cases`` (never
            labelled), so that the subset equals that of a fine-tuning run made with them.
        budget_source: where ``max_seconds`` came from (recorded), e.g. the run whose wall time it matches.
    """
    if (iterations is None) == (max_seconds is None):
        raise ConfigError("nnunet-scratch needs a budget: --iterations K or --max-seconds T (exactly one)")
    if iterations is not None and iterations < 1:
        raise ConfigError(f"--iterations {iterations}: must be >= 1")
    if max_seconds is not None and not max_seconds > 0:
        raise ConfigError(f"--max-seconds {max_seconds}: must be > 0")
    if not gpu_memory_target_gb > 0:
        raise ConfigError(f"--gpu-memory-target {gpu_memory_target_gb}: must be > 0 (GB)")
    if workers < 0:
        raise ConfigError(f"--workers {workers}: must be >= 0")
    if n_labeled is not None and fraction is not None:
        raise ConfigError("give --n-labeled or --fraction, not both")
    prepared = PreparedData(data)
    if prepared.kind != "labelled":
        raise CacheError(f"{prepared.root} is an unlabelled pool; nnunet-scratch needs prepared labelled data")
    subset, validation = labelled_cases(prepared, seed, n_labeled, fraction, validation_cases, validation_seed)
    test = prepared.split("test")
    if not test:
        raise CacheError(f"{prepared.root}: the test split holds no case, nothing for nnU-Net to predict")
    require_nnunet()

    run_dir = check_writable_folder(out, "--out")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model": f"nnU-Net v2 {CONFIGURATION}", "arm": ARM, "data": str(prepared.root.resolve()),
        "n_labeled": n_labeled, "fraction": fraction, "seed": seed, "iterations": iterations,
        "max_seconds": max_seconds, "budget_source": budget_source, "gpu_memory_target_gb": float(gpu_memory_target_gb),
        "workers": workers, "mirroring": mirroring, "validation_cases": validation_cases,
        "validation_seed": validation_seed, "lr": 1e-2, "precision": "32-true", "accelerator": "cpu",
    }
    from medpretrain.engine.run_folder import run_folder_lock

    with run_folder_lock(run_dir, "nnunet-scratch"):
        run_file = run_dir / "run.json"
        if run_file.exists():
            old = json.loads(run_file.read_text(encoding="utf-8"))
            if old.get("kind") != RUN_KIND:
                raise ConfigError(f"{run_dir} holds another kind of run ({old.get('kind')}); choose a new --out")
            if not _same_settings(old.get("config", {}), config):
                raise ConfigError(f"{run_dir} holds an nnunet-scratch run with other settings; choose a new --out or "
                                  "delete that folder")
            if old.get("finished") and all((run_dir / PREDICTIONS / f"{c}{FILE_ENDING}").is_file() for c in test):
                log.info("%s: this nnU-Net run has finished already (delete the folder to run it again)", run_dir)
                return run_dir
            log.warning("%s: an interrupted nnU-Net run starts over (its training is not resumed)", run_dir)
        for stale in (run_dir / "nnunet", run_dir / PREDICTIONS, run_dir / "eval"):
            if stale.exists():
                shutil.rmtree(stale)
        info: dict[str, Any] = {
            "kind": RUN_KIND, "arm": ARM, "finished": False, "data": str(prepared.root.resolve()), "config": config,
            "validation_cases": validation, "labeled_cases": subset, "n_labeled": len(subset), "test_cases": test,
            "in_channels": prepared.in_channels, "out_channels": prepared.num_classes, "labels": prepared.labels,
            "preprocess": prepared.manifest["preprocess"], "predictions": PREDICTIONS,
            "prediction_space": "each test image's original geometry (nnU-Net's export); evaluate maps them into the "
                                "prepared grid as prepare mapped the ground truth",
        }
        atomic_write_json(run_file, info)
        with open(run_dir / "nnunet.log", "a", encoding="utf-8") as nn_log, \
                nnunet_environment(run_dir / "nnunet", workers), contextlib.redirect_stdout(nn_log):
            _run(prepared, run_dir, info, subset, test, iterations, max_seconds, gpu_memory_target_gb, mirroring,
                 seed, workers)
        info["finished"] = True
        atomic_write_json(run_file, info)
    t = info["training"]
    log.info("nnU-Net scratch: %d iterations in %.0f s (%.2f s/iteration, stopped by %s); %d test predictions in %s",
             t["steps_done"], t["wall_time_s"], t["s_per_step"], t["stopped_by"], len(test), run_dir / PREDICTIONS)
    return run_dir


def build_trainer(root: Path, identifier: str, seed: int, iterations: int | None, max_seconds: float | None):
    """nnU-Net's trainer (``nnUNetTrainerBudget``) for the preprocessed dataset under ``root`` (an nnU-Net tree as
    ``nnunet_environment`` sets it), seeded, on the CPU, with its budget set."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from medpretrain.interop.nnunet_trainer import nnUNetTrainerBudget

    pre_dir = root / "preprocessed" / DATASET_NAME
    plans = load_json(str(pre_dir / f"{identifier}.json"))
    plans["continue_training"] = False
    dataset_json = load_json(str(pre_dir / "dataset.json"))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    trainer = nnUNetTrainerBudget(plans=plans, configuration=CONFIGURATION, fold=FOLD, dataset_json=dataset_json,
                                  device=torch.device("cpu"))
    trainer.budget_iterations, trainer.budget_seconds, trainer.seed = iterations, max_seconds, seed
    return trainer


def _run(prepared: PreparedData, run_dir: Path, info: dict, subset: list[str], test: list[str],
         iterations: int | None, max_seconds: float | None, gpu_memory_target_gb: float, mirroring: bool,
         seed: int, workers: int) -> None:
    import torch

    root = run_dir / "nnunet"
    raw = write_raw_dataset(prepared, root / "raw", subset, test)
    log.info("nnU-Net: planning and preprocessing %d labelled case(s) (GPU-memory target %g GB)", len(subset),
             gpu_memory_target_gb)
    _, identifier, stage_seconds = _plan_and_preprocess(gpu_memory_target_gb)

    trainer = build_trainer(root, identifier, seed, iterations, max_seconds)
    summary = _plans_summary(trainer.plans_manager.plans, identifier, gpu_memory_target_gb, 0)
    log.info("nnU-Net plans: spacing %s, patch %s, batch %d, %s with %d stages (features %s)", summary["spacing"],
             summary["patch_size"], summary["batch_size"], summary["network"]["class"].rsplit(".", 1)[-1],
             summary["network"]["n_stages"], summary["network"]["features_per_stage"])
    trainer.run_training()
    summary["network"]["parameters"] = int(sum(p.numel() for p in trainer.network.parameters()))
    steps = trainer.iterations_done
    info["training"] = {
        "steps_done": steps,
        "wall_time_s": round(trainer.train_seconds, 2),
        "s_per_step": round(trainer.train_seconds / max(steps, 1), 4),
        "setup_s": round(trainer.setup_seconds, 2),  # nnU-Net's start-up, inside wall_time_s
        "planned_iterations": trainer.planned_iterations,
        "stopped_by": trainer.stopped_by,
        "budget": {"iterations": iterations, "max_seconds": max_seconds},
        "final_lr": trainer.history[-1][3] if trainer.history else None,
        "final_loss": trainer.history[-1][2] if trainer.history else None,
        "precision": "32-true",
        "threads": torch.get_num_threads(),
        "workers": workers,
    }
    _write_curve(run_dir, trainer.history)

    # nnU-Net's predictor, initialised with the trained network as its trainer does for its final validation.
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.trained_state()], trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    out_dir = run_dir / PREDICTIONS
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = [[str(raw / "imagesTs" / f"{cid}_{c:04d}{FILE_ENDING}") for c in range(prepared.in_channels)]
              for cid in test]
    log.info("nnU-Net: predicting %d test case(s)%s", len(test), " with mirroring" if mirroring else "")
    t = time.perf_counter()
    predictor.predict_from_files_sequential(inputs, [str(out_dir / cid) for cid in test], save_probabilities=False,
                                            overwrite=True)
    predict_s = time.perf_counter() - t
    missing = [cid for cid in test if not (out_dir / f"{cid}{FILE_ENDING}").is_file()]
    if missing:
        raise DataError(f"nnU-Net wrote no prediction for {len(missing)} test case(s) (e.g. {missing[0]}); see "
                        f"{run_dir / 'nnunet.log'}")
    info["nnunet"] = {
        "version": _version(),
        "dataset": DATASET_NAME,
        "fold": FOLD,
        "trainer": type(trainer).__name__,
        "checkpoint": str((Path(trainer.output_folder) / "checkpoint_final.pth").relative_to(run_dir)),
        **stage_seconds,
        **summary,
        "training": {
            "loss": "Dice + CE (nnU-Net's DC_and_CE_loss), deep supervision",
            "optimizer": f"SGD lr {trainer.initial_lr:g}, momentum 0.99, Nesterov, "
                         f"weight decay {trainer.weight_decay:g}",
            "lr_schedule": ("poly (exponent 0.9) over " + (f"{iterations} iterations" if iterations is not None
                                                           else f"{max_seconds:g} s of training")),
            "oversample_foreground_percent": trainer.oversample_foreground_percent,
            "augmentation": "nnU-Net's default batchgeneratorsv2 pipeline",
        },
        "inference": {
            "tile_step_size": predictor.tile_step_size,
            "use_gaussian": predictor.use_gaussian,
            "use_mirroring": predictor.use_mirroring,
            "mirror_axes": list(trainer.inference_allowed_mirroring_axes or []),
            "seconds_per_case": round(predict_s / max(len(test), 1), 2),
        },
    }
    sys.stdout.flush()
