"""The stages of the GPU check (``check.py`` runs each in its own process with its own time limit).

A stage is ``stage_NAME(ctx, rec)``: ``ctx`` is the plan (mode, device, folders, sizes; a JSON-able dict made
by ``plan``), ``rec`` a :class:`Recorder` that writes the stage's results to disk after every step, so that a
stage killed at its time limit still leaves what it measured. Training, evaluation and prediction go through
the ``medpretrain`` command line (the typer app, called in the stage's process: the GPU machine pays the
start-up of torch, Lightning and MONAI once, in ``check.py``, and every stage is forked from there).

Sizes: ``plan("gpu")`` is sized for one H200 within the check's ~6 minutes; ``plan("dry-run")`` runs the same
code on CPU with tiny patches, a few steps and three cases, so that the test suite keeps the script working.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# The preset patch of every registered network: the one its papers or our CPU recipes train at (X, Y, Z).
# The GPU networks at 96^3 (the papers' Swin UNETR / UNETR downstream patch), PCT-Net at the paper's
# 64x128x128 DxHxW sub-volume; the CPU presets at the calibrated 64x64x48 recipe (Swin needs multiples of 32).
MODEL_PATCH: dict[str, tuple[int, int, int]] = {
    "unet": (64, 64, 48),
    "unet-large": (96, 96, 96),
    "dynunet": (96, 96, 96),
    "dynunet-small": (64, 64, 48),
    "unetr": (96, 96, 96),
    "unetr-small": (64, 64, 48),
    "swinunetr": (96, 96, 96),
    "swinunetr-small": (64, 64, 64),
    "pctnet": (128, 128, 64),
    "pctnet-small": (64, 64, 48),
    "resenc-l": (128, 128, 128),
    "resenc-l-cpu": (64, 64, 48),
    "plainconv-unet": (128, 128, 128),
    "plainconv-unet-cpu": (64, 64, 48),
}

# The networks whose training speed the issue asks for, at the patches GPU users train them at.
THROUGHPUT_PATCH: dict[str, tuple[int, int, int]] = {
    "unet": (96, 96, 96),
    "unet-large": (96, 96, 96),
    "dynunet": (96, 96, 96),
    "swinunetr": (96, 96, 96),
    "pctnet": (128, 128, 64),
    "unetr": (96, 96, 96),
}

# bf16 autocast vs fp32 on the same weights and batch: bf16 keeps 8 significand bits (relative rounding
# 2^-9 ~ 0.2% per operation), so deep networks end near 1% relative error in their logits. These bounds flag a
# network whose bf16 training diverges from fp32 by much more than rounding explains.
TOLERANCE = {"logits_rel": 0.05, "loss_rel": 0.02, "grad_cos_min": 0.95}

SEED_METHODS = ("avsdb", "volume-fusion", "asa", "alice")


def registered_method_names() -> tuple[str, ...]:
    """Every pretraining method registered in ``src/medpretrain/methods/``, the four seed methods first, read
    from the modules' ``register_method(PretrainMethod(name=...))`` without importing them: the check's parent
    process imports no torch (its stages may fork). tests/test_gpu_check.py holds this equal to the registry."""
    import re

    found = set()
    for path in sorted((REPO / "src" / "medpretrain" / "methods").glob("[!_]*.py")):
        text = path.read_text(encoding="utf-8")
        for block in text.split("register_method(PretrainMethod(")[1:]:
            name = re.search(r"""name\s*=\s*(?:["']([a-z][a-z0-9-]*)["']|([A-Za-z_]\w*))""", block)
            if name and name.group(2):  # name=NAME: the module's constant
                name = re.search(rf"""^{name.group(2)}\s*=\s*["']([a-z][a-z0-9-]*)["']""", text, re.M)
            if name and name.group(1):
                found.add(name.group(1))
    return tuple(m for m in SEED_METHODS if m in found) + tuple(sorted(found - set(SEED_METHODS)))


METHOD_ORDER = registered_method_names()


def plan(mode: str, work: Path, out: Path, data: Path | None = None, cpu_count: int | None = None) -> dict:
    """The check's settings for ``mode`` (``gpu`` or ``dry-run``) as a JSON-able dict.

    Args:
        mode: ``gpu`` (one CUDA device, the sizes of the issue) or ``dry-run`` (CPU, tiny sizes).
        work: scratch folder (prepared data, runs).
        out: results folder (``gpu_check.json``, ``.md``, ``.log``).
        data: raw la2018 subset (``make_data.py``); dry run: None = a 2 + 1 case copy of whichever of
            ``.gpu-data/la2018`` and ``../shared/data/la2018`` exists, else a synthetic data set.
        cpu_count: processor count (default: this machine's).
    """
    cpus = cpu_count or os.cpu_count() or 1
    gpu = mode == "gpu"
    ctx: dict[str, Any] = {
        "mode": mode,
        "device": "cuda" if gpu else "cpu",
        "work": str(work),
        "out": str(out),
        "data": str(data) if data else (str(REPO / ".gpu-data" / "la2018") if gpu else None),
        "raw": str(work / "raw"),
        "prepared": str(work / "prepared" / "la2018"),
        "prepared_pool": str(work / "prepared" / "pool"),
        "runs": str(work / "runs"),
        "prepare_workers": min(12, cpus) if gpu else 1,
    }
    if gpu:
        ctx.update({
            # Four stages side by side, four threads each: 16 cores (the GPU does the arithmetic).
            "threads": 4,
            "parallel": 4,
            "models": {}, "models_batch": 2,  # {} = every registered network at MODEL_PATCH
            "method": {"preset": "paper", "steps": 20, "batch": 2, "checkpoint_every": 10, "num_workers": 4,
                       "matcher_steps": 20, "config": {"alice": {"match_points": 2, "match_partners": 2}}},
            "finetune": {"model": "swinunetr", "patch": (96, 96, 96), "batch": 2, "lr": 1e-4, "n_labeled": 4,
                         "steps": 30, "checkpoint_every": 10, "num_workers": 8, "overlays": 2, "predict_cases": 2},
            "ddp": {"model": "unet", "steps": 5, "batch": 2, "num_workers": 4},
            "throughput": {"models": THROUGHPUT_PATCH, "warmup": 3, "steps": 10, "probe_steps": 2,
                           "max_batch": 64, "slow_step_s": 2.5, "loader_workers": max(1, min(12, cpus - 2)),
                           "loader_warmup": 2, "loader_steps": 8, "loader_max_batch": 16},
        })
    else:
        # Sized for a busy 2-core machine: one thread per stage, the narrowest networks that build, a step or
        # two. Swin UNETR (64^3 at least) is left out of `models`; the ASA stage runs it.
        tiny_unet = {"features": [4, 4, 8, 8, 16, 4]}
        tiny_pctnet = {"features": [4, 8, 16, 32, 64], "num_heads": [2, 2, 4]}
        tiny_matcher = {"patch": [32, 32, 32], "width": 4, "anchors": 8, "coarse_negatives": 8, "fine_negatives": 4}
        ctx.update({
            "threads": 1,
            "parallel": 3,
            "models": {"unet": {"patch": (32, 16, 16), "options": tiny_unet},
                       "dynunet-small": {"patch": (32, 16, 16), "options": {"filters": [4, 8, 8, 16, 16]}},
                       "unetr-small": {"patch": (32, 16, 16), "options": {"hidden_size": 48, "mlp_dim": 96}},
                       "pctnet-small": {"patch": (32, 32, 16), "options": tiny_pctnet}},
            "models_batch": 1,
            # Every method's smoke preset (the method contract's: a tiny network and patch, seconds on a CPU).
            "method": {"preset": "smoke", "steps": 1, "batch": 1, "checkpoint_every": 1, "num_workers": 0,
                       "matcher_steps": 1, "matcher_config": tiny_matcher, "config": {}},
            "finetune": {"model": "unet", "patch": (48, 48, 32), "batch": 1, "lr": 1e-3, "n_labeled": 1,
                         "steps": 2, "checkpoint_every": 1, "num_workers": 0, "overlays": 1, "predict_cases": 1,
                         "config": {"model_options": tiny_unet}},
            "ddp": {"model": "unet", "patch": (32, 32, 16), "steps": 1, "batch": 1, "num_workers": 0,
                    "config": {"model_options": tiny_unet}},
            "throughput": {"models": {"unet": {"patch": (32, 16, 16), "options": tiny_unet}}, "warmup": 1,
                           "steps": 1, "probe_steps": 1, "max_batch": 4, "slow_step_s": 30.0, "loader_workers": 1,
                           "loader_warmup": 1, "loader_steps": 1, "loader_max_batch": 4},
        })
    return json.loads(json.dumps(ctx))  # tuples become lists: the same dict a spawned stage reads back


# ------------------------------------------------------------------------------------------ recording


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Recorder:
    """A stage's results, rewritten to ``path`` (JSON) after every change.

    ``result`` holds what the stage measured; ``checks`` maps a check name to ``{"ok": bool, "detail": ...}``;
    the stage counts as passed when it ends normally and every check is ok.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.result: dict[str, Any] = {}
        self.checks: dict[str, dict] = {}
        self.error: str | None = None
        self.flush()

    def set(self, key: str, value: Any) -> Any:
        self.result[key] = value
        self.flush()
        return value

    def item(self, group: str, key: str, value: Any) -> Any:
        """Set ``result[group][key]`` (one model, one method...)."""
        self.result.setdefault(group, {})[key] = value
        self.flush()
        return value

    def check(self, name: str, ok: bool, detail: Any = None) -> bool:
        self.checks[name] = {"ok": bool(ok), "detail": detail}
        self.flush()
        return bool(ok)

    def fail(self, error: str) -> None:
        self.error = error
        self.flush()

    def flush(self) -> None:
        atomic_write_text(self.path, json.dumps({"result": self.result, "checks": self.checks, "error": self.error},
                                                indent=1, default=_jsonable))


def _jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return repr(obj)


def _error_text(exc: BaseException, limit: int = 4000) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return text[-limit:]


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]


# ------------------------------------------------------------------------------------------ helpers


def cli(args: list[str]) -> float:
    """Run ``medpretrain ARGS`` in this process (the typer app, as the console script runs it); returns seconds.

    Raises the command's exception (a MedpretrainError names the problem) or RuntimeError on a non-zero exit.
    """
    from medpretrain.cli import app

    print("$ medpretrain " + " ".join(str(a) for a in args), flush=True)
    t0 = time.perf_counter()
    try:
        app(args=[str(a) for a in args], prog_name="medpretrain", standalone_mode=False)
    except SystemExit as exc:  # typer/click exit paths
        if exc.code not in (0, None):
            raise RuntimeError(f"medpretrain {args[0]} exited with status {exc.code}") from None
    return round(time.perf_counter() - t0, 2)


def model_entry(value) -> tuple[list[int], dict]:
    """``(patch, model options)`` of a plan's model entry: a patch, or ``{"patch": ..., "options": ...}`` (the
    dry run narrows the networks through their registered options)."""
    if isinstance(value, dict):
        return list(value["patch"]), dict(value.get("options") or {})
    return list(value), {}


def set_threads(ctx) -> None:
    """The stage's torch thread count (the dry run: 1, so that stages side by side do not oversubscribe a small
    CPU, where OpenMP's waiting threads make every step many times slower)."""
    if ctx.get("threads"):
        import torch

        torch.set_num_threads(int(ctx["threads"]))


def _device(ctx):
    import torch

    return torch.device(ctx["device"])


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> float:
    """Peak memory since the last reset: CUDA allocations on a GPU, the process's peak RSS on CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _remaining(ctx) -> float:
    return ctx.get("stage_deadline", math.inf) - time.time()


def _run_json(run: Path) -> dict:
    path = Path(run) / "run.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _last_logged(run: Path, prefix: str = "train/") -> dict[str, float]:
    """The last logged value of every ``train/...`` column of a run's CSV log: the total ``train/loss`` as the
    last step logged it; every other column's last finite value (ASA logs the terms of the phase it is not in
    as NaN)."""
    import csv

    path = Path(run) / "logs" / "csv" / "metrics.csv"
    last: dict[str, float] = {}
    if not path.is_file():
        return last
    with open(path, encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                if not k or not k.startswith(prefix) or v in ("", None):
                    continue
                if k == "train/loss" or math.isfinite(float(v)) or k not in last:
                    last[k] = float(v)
    return last


def _all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


# ------------------------------------------------------------------------------------------ env


def stage_env(ctx, rec: Recorder) -> None:
    """What the check runs on, as torch sees it: CUDA build, device, bf16, NCCL, and a matrix product."""
    import torch

    from medpretrain.engine.device import cpu_supports_bf16, resolve_precision

    device = _device(ctx)
    rec.set("torch", torch.__version__)
    rec.set("torch_cuda_build", torch.version.cuda)
    rec.set("cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    rec.set("precision_auto", resolve_precision("auto", "auto"))
    if device.type != "cuda":
        rec.set("cpu_native_bf16", cpu_supports_bf16())
        rec.check("device", True, "cpu (dry run)")
        return
    available = torch.cuda.is_available()
    if not rec.check("cuda_available", available, f"{torch.cuda.device_count()} device(s)"):
        return
    props = torch.cuda.get_device_properties(0)
    rec.set("device", {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1),
                       "multiprocessors": props.multi_processor_count})
    rec.set("bf16_native", torch.cuda.is_bf16_supported(including_emulation=False))
    try:
        version = torch.cuda.nccl.version()
        rec.set("nccl", ".".join(map(str, version)) if isinstance(version, tuple) else str(version))
    except Exception as exc:  # NCCL missing is a finding, not a crash
        rec.set("nccl", f"unavailable: {_short(exc)}")
    rec.check("precision_auto_is_bf16", rec.result["precision_auto"] == "bf16-mixed", rec.result["precision_auto"])
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    rec.set("bf16_matmul_tflops", round(10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12, 1))


# ------------------------------------------------------------------------------------------ models (a)


def _without_dropout(model) -> None:
    """Set every dropout and drop-path probability to 0, so that two passes see the same network."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for attr in ("drop_prob", "attn_drop"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def _as_float(out):
    return type(out)(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()


def _loss_of(module, out, image, label):
    """The module's training loss on given network outputs (deep supervision for a tuple of scales), as
    ``SegmentationModule.compute_loss`` computes it from the network's outputs."""
    if isinstance(out, (tuple, list)):
        from medpretrain.blocks.deep_supervision import DeepSupervisionLoss

        return DeepSupervisionLoss(module.loss_fn)(out, label)
    return module.loss_fn(module._full_resolution(out, image), label)


def _full(out):
    first = out[0] if isinstance(out, (tuple, list)) else out
    return first.detach().float()


def _grads(module):
    import torch

    return torch.cat([p.grad.detach().float().flatten() for p in module.parameters() if p.grad is not None])


def _rel(a, b) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_precision(name: str, patch, batch: int, device, options: dict | None = None) -> dict:
    """Forward and backward of network ``name`` in fp32 and in bf16 autocast (the loss in fp32) on the same
    weights and batch; relative errors of logits, loss and gradients, with the fp32 run repeated as the noise
    floor. Also the loss computed entirely under autocast, as Lightning's ``bf16-mixed`` training step does."""
    import torch

    from medpretrain.config import FinetuneConfig
    from medpretrain.engine.module import SegmentationModule

    torch.manual_seed(0)
    cfg = FinetuneConfig(model=name, patch=tuple(patch), model_options=options or {})
    module = SegmentationModule(cfg, 1, 2).to(device).train()
    _without_dropout(module.model)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, 1, *patch, generator=gen).to(device)
    # A blob of foreground so that Dice has something to measure on every sample.
    y = torch.zeros(batch, 1, *patch, dtype=torch.long)
    sl = tuple(slice(s // 4, 3 * s // 4) for s in patch)
    y[(slice(None), 0, *sl)] = 1
    y = y.to(device)

    outputs = []

    def run(autocast: bool):
        module.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = module.model(x)
        outputs.append(f"{len(out)} scales (deep supervision)" if isinstance(out, (tuple, list)) else "one tensor")
        loss = _loss_of(module, _as_float(out), x, y)  # outside autocast: fp32
        loss.backward()
        return _full(out), float(loss.detach()), _grads(module)

    # A true fp32 reference: cuDNN convolutions default to TF32 on Ampere and later.
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        tf32_off = True
    except Exception:  # a torch whose legacy TF32 switches refuse: the reference is then TF32, and says so
        tf32_off = False
    try:
        logits32, loss32, grad32 = run(False)
        logits32b, loss32b, grad32b = run(False)
    finally:
        if tf32_off:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    _reset_peak(device)
    t0 = time.perf_counter()
    logits16, loss16, grad16 = run(True)
    _sync(device)
    bf16_s = time.perf_counter() - t0
    peak = _peak_gb(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        loss_autocast = float(module.compute_loss(x, y))
    cos = float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0))
    r = {
        "patch": list(patch), "batch": batch,
        "parameters_m": round(sum(p.numel() for p in module.parameters()) / 1e6, 2),
        "loss_fp32": loss32, "loss_bf16": loss16, "loss_all_autocast": loss_autocast,
        "logits_rel": _rel(logits16, logits32), "loss_rel": abs(loss16 - loss32) / max(abs(loss32), 1e-30),
        "loss_all_autocast_rel": abs(loss_autocast - loss32) / max(abs(loss32), 1e-30),
        "grad_rel": _rel(grad16, grad32), "grad_cos": cos,
        "fp32_repeat_logits_rel": _rel(logits32b, logits32), "fp32_repeat_grad_rel": _rel(grad32b, grad32),
        "bf16_pass_s": round(bf16_s, 3), "bf16_peak_gb": peak, "outputs": outputs[0],
        "reference": "fp32" if tf32_off or device.type != "cuda" else "fp32 with TF32 convolutions",
    }
    finite = _all_finite([loss32, loss16, loss_autocast]) and bool(torch.isfinite(grad16).all())
    r["finite"] = bool(finite)
    r["ok"] = bool(finite and r["logits_rel"] <= TOLERANCE["logits_rel"] and r["loss_rel"] <= TOLERANCE["loss_rel"]
                   and cos >= TOLERANCE["grad_cos_min"])
    del module, x, y
    return r


def stage_models(ctx, rec: Recorder) -> None:
    """(a) Every registered network at its preset patch: bf16 autocast vs fp32, forward and backward."""
    from medpretrain.models import get_spec, list_models

    device = _device(ctx)
    models = ctx["models"] or {s.name: MODEL_PATCH.get(s.name) or _fitting_patch(s) for s in list_models()}
    rec.set("tolerance", TOLERANCE)
    for name, entry in models.items():
        patch, options = model_entry(entry)
        get_spec(name).check_patch(patch)
        try:
            r = compare_precision(name, patch, ctx["models_batch"], device, options)
        except Exception as exc:
            r = {"patch": list(patch), "ok": False, "error": _short(exc)}
            print(_error_text(exc), file=sys.stderr, flush=True)
        rec.item("models", name, r)
        detail = r.get("error") or {k: r.get(k) for k in ("logits_rel", "loss_rel", "grad_cos")}
        if ctx["mode"] == "gpu":
            rec.check(f"model:{name}", r["ok"], detail)
        else:
            # Tiny networks at tiny patches normalise over a handful of bottleneck voxels, where bf16 rounding
            # is amplified far beyond what the preset sizes see: the dry run checks that both passes run and
            # stay finite; the bounds are judged on the GPU.
            rec.check(f"model:{name}", "error" not in r and r.get("finite", False), detail)
        _free(device)


def _fitting_patch(spec) -> list[int]:
    """96 per side rounded to the network's divisors (for a network registered after MODEL_PATCH was written)."""
    return [max(-(-spec.min_size // d) * d, round(96 / d) * d) for d in spec.divisors(3)]


# ------------------------------------------------------------------------------------------ data


def stage_prepare(ctx, rec: Recorder) -> None:
    """Prepare the la2018 subset (labelled) and its training images (unlabelled pool) through the CLI."""
    raw = Path(ctx["data"]) if ctx.get("data") else None
    if ctx["mode"] != "gpu":
        raw = _dry_run_data(ctx, rec)
    if raw is None or not (raw / "dataset.json").is_file():
        raise FileNotFoundError(f"{raw}: no la2018 copy here; run `python benchmarks/gpu/make_data.py` on the "
                                "development machine and carry .gpu-data in the run call")
    rec.set("raw", str(raw))
    workers = str(ctx["prepare_workers"])
    rec.set("prepare_s", cli(["prepare", "--dataset", raw, "--out", ctx["prepared"], "--workers", workers]))
    rec.set("prepare_pool_s", cli(["prepare", "--pool", raw / "pool.json", "--out", ctx["prepared_pool"],
                                   "--workers", workers]))
    from medpretrain.data.cache import PreparedData

    data, pool = PreparedData(ctx["prepared"]), PreparedData(ctx["prepared_pool"])
    rec.set("cases", {"train": len(data.split("train")), "test": len(data.split("test")), "pool": len(pool.case_ids)})
    rec.check("prepared", len(data.split("train")) > 0 and len(data.split("test")) > 0 and len(pool.case_ids) > 1,
              rec.result["cases"])


def _dry_run_data(ctx, rec: Recorder) -> Path:
    """A 2 train + 1 test copy of la2018 (the carried copy or ../shared), or a synthetic set where neither is."""
    sys.path.insert(0, str(HERE))
    from make_data import DEFAULT_OUT, DEFAULT_SOURCE, make_subset

    out = Path(ctx["raw"])
    source = Path(ctx["data"]) if ctx.get("data") else next(
        (p for p in (DEFAULT_OUT, DEFAULT_SOURCE) if (p / "splits.json").is_file()), None)
    if source is not None:
        rec.set("data_source", str(source))
        return make_subset(source, out, n_train=2, n_test=1)
    from medpretrain.synthetic.demo_data import make_demo_dataset

    rec.set("data_source", "synthetic (no la2018 copy on this machine)")
    make_demo_dataset(out, n_cases=3, size=(40, 36, 20), seed=0)
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    pool = [{"image": f"imagesTr/{cid}_0000.nii.gz", "modality": "MR"} for cid in splits["train"]]
    (out / "pool.json").write_text(json.dumps(pool), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------ pretraining (a)


def _write_yaml(path: Path, values: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def run_method(ctx, rec: Recorder, method: str) -> None:
    """(a) One pretraining method for a few steps through ``medpretrain pretrain`` (Alice: ``train-matcher``
    first, with the ``sam`` matcher, since SimpleITK's registration matcher does not travel)."""
    from medpretrain.methods import get_method

    m = ctx["method"]
    runs = Path(ctx["runs"])
    out = runs / f"pretrain-{method}"
    common = ["--steps", m["steps"], "--batch", m["batch"], "--checkpoint-every", m["checkpoint_every"],
              "--num-workers", m["num_workers"]]
    args = ["pretrain", "--method", method, "--preset", m["preset"], "--out", out, *common]
    if get_method(method).needs_data:
        args += ["--data", ctx["prepared_pool"]]
    if method == "alice":
        matcher = runs / "matcher"
        margs = ["train-matcher", "--data", ctx["prepared_pool"], "--out", matcher, "--steps", m["matcher_steps"],
                 "--num-workers", m["num_workers"]]
        if m.get("matcher_config"):
            margs += ["--config", _write_yaml(runs / "matcher.yaml", m["matcher_config"])]
        rec.set("train_matcher_s", cli(margs))
        args += ["--matcher", "sam", "--matcher-run", matcher]
    extra = m.get("config", {}).get(method)
    if extra:
        args += ["--config", _write_yaml(runs / f"{method}.yaml", extra)]
    rec.set("command", "medpretrain " + " ".join(map(str, args)))
    rec.set("wall_s", cli(args))
    info = _run_json(out)
    training = info.get("training", {})
    losses = _last_logged(out)
    rec.set("model", info.get("config", {}).get("model"))
    rec.set("patch", info.get("config", {}).get("patch"))
    rec.set("precision", info.get("precision"))
    rec.set("training", training)
    rec.set("last_logged", losses)
    rec.check("steps_done", training.get("steps_done") == m["steps"], training.get("steps_done"))
    rec.check("model_pt", (out / "model.pt").is_file())
    rec.check("loss_finite", math.isfinite(losses.get("train/loss", math.nan)), losses.get("train/loss"))


def _method_stage(method: str) -> Callable:
    def stage(ctx, rec):
        run_method(ctx, rec, method)

    stage.__doc__ = f"(a) {method}: a few pretraining steps through the CLI."
    return stage


# ------------------------------------------------------------------------------------------ fine-tuning (a)


def _state_diff(a: Path, b: Path) -> dict:
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=False)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=False)["state_dict"]
    worst, num, den = 0.0, 0.0, 0.0
    for k, va in sa.items():
        if torch.is_floating_point(va):
            d = (va.float() - sb[k].float())
            worst = max(worst, float(d.abs().max()) if d.numel() else 0.0)
            num += float(d.pow(2).sum())
            den += float(va.float().pow(2).sum())
    return {"max_abs": worst, "rel": math.sqrt(num / max(den, 1e-30)), "same_keys": set(sa) == set(sb)}


def stage_finetune(ctx, rec: Recorder) -> None:
    """(a) Fine-tune, simulate a crash after a checkpoint, ``--resume``, evaluate and predict, all via the CLI."""
    import nibabel as nib
    import numpy as np

    f = ctx["finetune"]
    run = Path(ctx["runs"]) / "finetune"
    args = ["finetune", "--data", ctx["prepared"], "--out", run, "--model", f["model"], "--patch", *f["patch"],
            "--batch", f["batch"], "--lr", f["lr"], "--n-labeled", f["n_labeled"], "--steps", f["steps"],
            "--checkpoint-every", f["checkpoint_every"], "--num-workers", f["num_workers"]]
    if f.get("config"):
        args += ["--config", _write_yaml(Path(ctx["runs"]) / "finetune.yaml", f["config"])]
    rec.set("command", "medpretrain " + " ".join(map(str, args)))
    rec.set("finetune_s", cli(args))
    info = _run_json(run)
    rec.set("precision", info.get("precision"))
    rec.set("training", info.get("training"))
    losses = _last_logged(run)
    rec.set("last_logged", losses)
    rec.check("finetune_steps", info.get("training", {}).get("steps_done") == f["steps"])
    rec.check("finetune_loss_finite", math.isfinite(losses.get("train/loss", math.nan)), losses.get("train/loss"))

    # A crash after the second-newest checkpoint: keep only it, then resume to the end through the CLI.
    shutil.copyfile(run / "model.pt", run / "model_uninterrupted.pt")
    ckpts = sorted((run / "checkpoints").glob("step*.ckpt"))
    keep = ckpts[-2] if len(ckpts) >= 2 else None
    for p in (run / "checkpoints").glob("*.ckpt"):
        if p != keep:
            p.unlink()
    (run / "model.pt").unlink()
    rec.set("resume_from", keep.name if keep else None)
    rec.set("resume_s", cli([*args, "--resume"]))
    info = _run_json(run)
    rec.check("resume_steps", info.get("training", {}).get("steps_done") == f["steps"]
              and info.get("training", {}).get("steps_this_session", 0) < f["steps"], info.get("training"))
    diff = _state_diff(run / "model_uninterrupted.pt", run / "model.pt")
    rec.set("resumed_vs_uninterrupted", diff)  # not bitwise on CUDA: non-deterministic kernels (no --deterministic)
    rec.check("resume_weights_close", diff["same_keys"] and diff["rel"] < 0.05, diff)

    rec.set("evaluate_s", cli(["evaluate", "--run", run, "--data", ctx["prepared"], "--overlays", f["overlays"]]))
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    overall = {k: v.get("mean") for k, v in metrics.get("overall", {}).items()}
    rec.set("evaluate", {"overall": overall, "cases": metrics.get("n_cases", metrics.get("cases"))})
    rec.check("evaluate_finite", bool(overall) and _all_finite(overall.values()), overall)

    raw = _raw_folder(ctx)
    test_ids = json.loads((raw / "splits.json").read_text(encoding="utf-8"))["test"][: f["predict_cases"]]
    inputs = run / "predict_in"
    inputs.mkdir(exist_ok=True)
    for cid in test_ids:
        shutil.copyfile(raw / "imagesTr" / f"{cid}_0000.nii.gz", inputs / f"{cid}_0000.nii.gz")
    outputs = run / "predict_out"
    rec.set("predict_s", cli(["predict", "--run", run, "--input", inputs, "--out", outputs]))
    geometry = {}
    for cid in test_ids:
        src, pred = nib.load(str(inputs / f"{cid}_0000.nii.gz")), outputs / f"{cid}.nii.gz"
        if not pred.is_file():
            geometry[cid] = "missing"
            continue
        out = nib.load(str(pred))
        same = out.shape[:3] == src.shape[:3] and np.allclose(out.affine, src.affine, atol=1e-4)
        labels = sorted(int(v) for v in np.unique(np.asarray(out.dataobj)))
        geometry[cid] = {"same_geometry": bool(same), "labels": labels}
    rec.set("predict", geometry)
    same_everywhere = all(isinstance(g, dict) and g["same_geometry"] for g in geometry.values())
    rec.check("predict_geometry", bool(geometry) and same_everywhere, geometry)


def _raw_folder(ctx) -> Path:
    """The raw dataset the prepare stage used (the dry run makes its own copy)."""
    raw = Path(ctx["raw"])
    return raw if (raw / "splits.json").is_file() else Path(ctx["data"])


def stage_ddp(ctx, rec: Recorder) -> None:
    """(a) ``finetune --devices 1 --strategy ddp``: the DDP code path (NCCL on CUDA, gloo on CPU) for a few steps."""
    d = ctx["ddp"]
    run = Path(ctx["runs"]) / "ddp"
    args = ["finetune", "--data", ctx["prepared"], "--out", run, "--model", d["model"], "--steps", d["steps"],
            "--checkpoint-every", d["steps"], "--batch", d["batch"], "--num-workers", d["num_workers"],
            "--devices", "1", "--strategy", "ddp"]
    if d.get("patch"):
        args += ["--patch", *d["patch"]]
    if d.get("config"):
        args += ["--config", _write_yaml(Path(ctx["runs"]) / "ddp.yaml", d["config"])]
    rec.set("command", "medpretrain " + " ".join(map(str, args)))
    import torch.distributed as dist

    # Lightning initialises the process group itself (and may tear it down): record the backend it asked for.
    init = dist.init_process_group

    def recording_init(*a, **kw):
        out = init(*a, **kw)
        rec.set("backend", dist.get_backend())
        return out

    dist.init_process_group = recording_init
    try:
        rec.set("wall_s", cli(args))
    finally:
        dist.init_process_group = init
    training = _run_json(run).get("training", {})
    rec.set("training", training)
    rec.check("ddp_steps", training.get("steps_done") == d["steps"] and training.get("world_size") == 1, training)
    expected = "nccl" if ctx["device"] == "cuda" else "gloo"
    rec.check("ddp_backend", rec.result.get("backend") == expected, rec.result.get("backend"))


# ------------------------------------------------------------------------------------------ throughput (b)


def _train_step(module, opt, device):
    """One optimizer step as Lightning's ``bf16-mixed`` runs it: loss under autocast, backward, AdamW."""
    import torch

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = module.compute_loss(x, y)
        loss.backward()
        opt.step()
        return loss

    return step


def _timed(step, x, y, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        step(x, y)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _module(name: str, patch, device, options: dict):
    import torch

    from medpretrain.config import FinetuneConfig
    from medpretrain.engine.module import SegmentationModule

    torch.manual_seed(0)
    cfg = FinetuneConfig(model=name, patch=tuple(patch), model_options=options)
    module = SegmentationModule(cfg, 1, 2).to(device).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    return module, opt


def _batch(batch: int, patch, device):
    import torch

    x = torch.randn(batch, 1, *patch, device=device)
    y = torch.randint(0, 2, (batch, 1, *patch), device=device)
    return x, y


def _capacity_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return math.inf


def measure_batch2(name: str, entry, t: dict, device) -> dict:
    """Steps/s and peak memory of ``name`` at batch 2 (bf16 autocast, synthetic batches)."""
    patch, options = model_entry(entry)
    module, opt = _module(name, patch, device, options)
    step = _train_step(module, opt, device)
    _reset_peak(device)
    x, y = _batch(2, patch, device)
    s = _timed(step, x, y, t["warmup"], t["steps"], device)
    r = {"patch": list(patch), "batch2": {"s_per_step": round(s, 4), "steps_per_s": round(1 / s, 2),
                                          "samples_per_s": round(2 / s, 1), "peak_gb": _peak_gb(device)}}
    del x, y, module, opt, step
    _free(device)
    return r


def measure_largest(name: str, entry, t: dict, device, ctx, batch2_peak_gb: float) -> dict:
    """The largest power-of-two batch that fits, by doubling from 4: a batch is tried while twice the previous
    peak stays below 92% of the card (peak memory grows about linearly with the batch), so a search normally
    ends without an out-of-memory error; one that happens anyway ends it the same way."""
    patch, options = model_entry(entry)
    module, opt = _module(name, patch, device, options)
    step = _train_step(module, opt, device)
    capacity = _capacity_gb(device)
    probes, largest, batch, last_peak, why = [], None, 4, batch2_peak_gb, "max_batch"
    while batch <= t["max_batch"]:
        if last_peak * 2 > 0.92 * capacity:
            why = f"memory: twice the last peak ({last_peak:.1f} GB) exceeds 92% of {capacity:.0f} GB"
            break
        if _remaining(ctx) < 20:
            why = "time"
            break
        _free(device)
        _reset_peak(device)
        oom = False
        try:
            x, y = _batch(batch, patch, device)
            s = _timed(step, x, y, 1, t["probe_steps"], device)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            oom = True
        x = y = None
        if oom:
            opt.zero_grad(set_to_none=True)
            _free(device)
            probes.append({"batch": batch, "oom": True})
            why = "memory: out of memory"
            break
        last_peak = _peak_gb(device)
        probes.append({"batch": batch, "s_per_step": round(s, 4), "samples_per_s": round(batch / s, 1),
                       "peak_gb": last_peak})
        largest = probes[-1]
        if s > t["slow_step_s"]:
            why = f"time: a step took {s:.1f} s"
            break
        batch *= 2
    del module, opt, step
    _free(device)
    return {"probes": probes, "largest_batch": largest, "largest_batch_limited_by": why}


def measure_loader(name: str, entry, batch: int, t: dict, device, ctx) -> dict:
    """Training steps with the real data loader in front (prepared la2018, flips, ``loader_workers`` workers):
    steps/s and the share of the time the GPU waits for data. As the engine trains on CUDA: persistent workers,
    pinned batches, flips on the device (``augment.on: auto``; the workers only read patches)."""
    from torch.utils.data import DataLoader

    from medpretrain.config import AugmentConfig
    from medpretrain.data.cache import PreparedData
    from medpretrain.data.sampling import PatchAugmenter, PatchDataset, StepSampler

    patch, options = model_entry(entry)
    data = PreparedData(ctx["prepared"])
    on_device = device.type == "cuda"
    dataset = PatchDataset(data, data.split("train"), patch, 1 / 3, seed=0, augment=AugmentConfig(),
                           augment_on_device=on_device)
    augment = PatchAugmenter(AugmentConfig(), patch)
    n = t["loader_warmup"] + t["loader_steps"]
    workers = t["loader_workers"]
    loader = DataLoader(dataset, batch_size=batch, sampler=StepSampler(n, batch), num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0, pin_memory=on_device)  # as engine/job.py
    module, opt = _module(name, patch, device, options)
    step = _train_step(module, opt, device)
    wait = total = 0.0
    it = iter(loader)
    for i in range(n):
        t0 = time.perf_counter()
        b = next(it)
        t1 = time.perf_counter()
        b = augment({k: v.to(device, non_blocking=True) for k, v in b.items()})
        step(b["image"], b["label"])
        _sync(device)  # the training step syncs too: the non-finite loss guard reads the loss every step
        if i >= t["loader_warmup"]:
            wait += t1 - t0
            total += time.perf_counter() - t0
    del it, loader, module, opt, step
    _free(device)
    steps = t["loader_steps"]
    return {"batch": batch, "workers": t["loader_workers"], "s_per_step": round(total / steps, 4),
            "steps_per_s": round(steps / total, 2), "samples_per_s": round(batch * steps / total, 1),
            "data_wait_fraction": round(wait / total, 3)}


def stage_throughput(ctx, rec: Recorder) -> None:
    """(b) Training speed and memory per network, in phases of falling value so that a stage cut by its time
    limit has the most useful numbers: batch 2 for every network; the real data loader in front at batch 2 (the
    GPU-idle share at the usual batch); each network's largest batch; the loader at that batch."""
    import torch

    device = _device(ctx)
    t = ctx["throughput"]
    torch.backends.cudnn.benchmark = device.type == "cuda"  # what our Trainer sets on CUDA (not deterministic)
    models = t["models"]
    results = rec.result.setdefault("models", {})
    have_data = (Path(ctx["prepared"]) / "manifest.json").is_file()
    if not have_data:
        rec.set("loader", "skipped: the prepare stage left no prepared data")

    def attempt(key: str, what: str, fn):
        if _remaining(ctx) < 20:
            rec.item("skipped", f"{key} {what}", "out of time")
            return None
        try:
            return fn()
        except Exception as exc:
            print(_error_text(exc), file=sys.stderr, flush=True)
            _free(device)
            return {"error": f"{what}: {_short(exc)}"}

    def loader_at(name: str, entry, batch: int) -> None:
        key = f"{name}@{batch}"
        lr = attempt(key, "loader", lambda: measure_loader(name, entry, batch, t, device, ctx))
        if lr is not None:
            rec.item("loader", key, lr)
            rec.check(f"loader:{key}", "error" not in lr, lr.get("error"))

    for name, entry in models.items():
        r = attempt(name, "batch 2", lambda: measure_batch2(name, entry, t, device))
        if r is not None:
            rec.item("models", name, r)
            rec.check(f"speed:{name}", "error" not in r, r.get("error"))
    if have_data:
        for name, entry in models.items():
            loader_at(name, entry, 2)
    for name, entry in models.items():
        if "batch2" not in results.get(name, {}):
            continue
        r = attempt(name, "largest batch",
                    lambda: measure_largest(name, entry, t, device, ctx, results[name]["batch2"]["peak_gb"]))
        if r is not None:
            rec.item("models", name, {**results[name], **r})
            rec.check(f"largest:{name}", "error" not in r, r.get("error"))
    if have_data:
        for name, entry in models.items():
            largest = (results.get(name, {}).get("largest_batch") or {}).get("batch") or 2
            if min(largest, t["loader_max_batch"]) > 2:
                loader_at(name, entry, min(largest, t["loader_max_batch"]))


STAGES: dict[str, Callable] = {
    "env": stage_env,
    "models": stage_models,
    "prepare": stage_prepare,
    "finetune": stage_finetune,
    **{f"pretrain-{m}": _method_stage(m) for m in METHOD_ORDER},
    "ddp": stage_ddp,
    "throughput": stage_throughput,
}
