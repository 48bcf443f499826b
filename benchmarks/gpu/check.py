"""The GPU check's driver: runs the stages of ``stages.py`` in order of value, each in its own process with its
own time limit inside one overall budget, and keeps ``OUT/gpu_check.json``, ``OUT/gpu_check.md`` and
``OUT/gpu_check.log`` up to date after every stage (and every few seconds while stages run), so that whatever
stops the check, what it measured so far is on disk.

Run it through ``benchmarks/gpu/check.sh`` (which installs the carried wheels first); see
``benchmarks/gpu/README.md``. Directly:

    python benchmarks/gpu/check.py --out runs/gpu-check              # on the GPU machine
    python benchmarks/gpu/check.py --dry-run --out /tmp/gpu-check    # on CPU, tiny sizes (the test suite)

Stages run as children forked from this process after it imported torch, Lightning, MONAI and medpretrain
once (seconds per stage saved; on a busy CPU tens of seconds). This process never initialises CUDA (forked
children could not use it then); if an import did, the stages are started as fresh interpreters instead.
Each child leads its own process group, so a stage past its limit is stopped with everything it started
(DataLoader workers included).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.abc
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # benchmarks/_common.py: the machine block shared by every benchmark script
from _common import cpu_model  # noqa: E402

import stages as S  # noqa: E402

# Stage -> (time limit in seconds, what it shows). Limits are for the GPU; every limit is also cut to what is
# left of the overall budget.
STAGE_INFO: dict[str, tuple[float, str]] = {
    "env": (60, "CUDA, device, bf16, NCCL and a bf16 matrix product"),
    "models": (150, "(a) every registered network: bf16 autocast vs fp32 forward + backward"),
    "prepare": (120, "la2018 subset and pool prepared through the CLI"),
    "finetune": (200, "(a) fine-tune, crash + --resume, evaluate, predict through the CLI"),
    "pretrain-avsdb": (150, "(a) AVS-DB pretraining steps"),
    "pretrain-volume-fusion": (150, "(a) Volume Fusion pretraining steps"),
    "pretrain-asa": (150, "(a) ASA pretraining steps"),
    "pretrain-alice": (180, "(a) train-matcher, then Alice pretraining steps"),
    # A method registered later joins with the default limit.
    **{f"pretrain-{m}": (150, f"(a) {m} pretraining steps") for m in S.METHOD_ORDER if m not in S.SEED_METHODS},
    "ddp": (120, "(a) finetune --devices 1 --strategy ddp"),
    "throughput": (200, "(b) steps/s and peak memory per network, then with the real loader"),
}
# Groups run one after another; the stages of a group run side by side (up to --parallel). The order is the
# issue's order of value; `models` needs no data, so it overlaps the CPU-bound `prepare`.
GROUPS: list[list[str]] = [
    ["env"],
    ["models", "prepare"],
    ["finetune", *(f"pretrain-{m}" for m in S.METHOD_ORDER), "ddp"],
    ["throughput"],
]
NEEDS: dict[str, tuple[str, ...]] = {
    **{name: ("prepare",) for name in GROUPS[2] if name != "pretrain-avsdb"},
}
# 300 s of stages + ~15 s of wheel installation: a check and a rerun fit the 15 minutes of device time a
# session has, machine start included.
DEFAULT_BUDGET_S = {"gpu": 300.0, "dry-run": 600.0}
RESERVE_S = 8.0  # kept for writing the report after the last stage
MIN_STAGE_S = 15.0  # a stage given less than this is skipped rather than started to be killed
LOG_TAIL_BYTES = 400_000  # per stage, so that the log stays far below the 16 MiB a returned file may have
# Distributions whose versions the report states (the check's dependencies, and SimpleITK's absence).
DISTRIBUTIONS = ("torch", "lightning", "pytorch-lightning", "monai", "nibabel", "pydantic", "pydantic-core",
                 "numpy", "scipy", "typer", "rich", "PyYAML", "einops", "matplotlib", "tensorboard",
                 "typing-extensions", "SimpleITK")


# ------------------------------------------------------------------------------------------ environment


class BlockImports(importlib.abc.MetaPathFinder):
    """Refuses to import the named top-level modules: the dry run's stand-in for the GPU machine, which lacks
    them (SimpleITK), so that a stage that would import one fails here first."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname} is blocked in the GPU check's dry run: the GPU machine does not "
                                      "have it (keep its import lazy, inside the function that needs it)",
                                      name=fullname)
        return None


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.stdout.strip() if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def host_environment() -> dict:
    """Facts this process can read without initialising CUDA: Python, machine, driver, installed versions."""
    versions, origins = {}, {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    for module in ("torch", "monai", "nibabel", "pydantic", "lightning", "medpretrain"):
        try:
            spec = importlib.util.find_spec(module)
            origins[module] = str(Path(spec.origin).parent) if spec and spec.origin else None
        except (ImportError, ValueError):
            origins[module] = None
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"])
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        import medpretrain

        ours = medpretrain.__version__
    except Exception as exc:  # reported, not fatal: the stages report the same failure in detail
        ours = f"import failed: {type(exc).__name__}: {exc}"
    return {
        "python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
        "memory_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "nvidia_smi": smi.splitlines() if smi else None,
        "versions": versions, "module_origins": origins, "medpretrain": ours,
        "wheels": os.environ.get("GPU_CHECK_WHEELS", "not installed by check.sh"),
        # The GPU machine gets the tree without .git: the digest says which source ran there.
        "source_digest": source_digest(),
        "git_commit": _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])),
    }


def source_digest() -> str:
    """SHA-256 (12 hex digits) over the paths and contents of ``src/medpretrain`` and ``benchmarks/gpu`` sources:
    the same digest here and in a GPU report means the same code ran."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted([*(REPO / "src" / "medpretrain").rglob("*.py"), *HERE.glob("*.py"), *HERE.glob("*.sh")])
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def preload() -> str | None:
    """Import what every stage needs once, here, so that forked stages start at once; the error text if it
    failed (each stage then reports its own failure in detail)."""
    try:
        import lightning.pytorch  # noqa: F401
        import monai.networks.nets  # noqa: F401
        import torch  # noqa: F401

        import medpretrain.api  # noqa: F401
        import medpretrain.cli  # noqa: F401
        import medpretrain.engine.finetune  # noqa: F401
        import medpretrain.engine.pretrain  # noqa: F401
        from medpretrain.methods import list_methods

        list_methods()
        return None
    except BaseException as exc:  # noqa: BLE001 - a broken import must not stop the report
        return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        return False


# ------------------------------------------------------------------------------------------ running stages


@dataclass
class Job:
    """One running stage: its process (leader of its own process group) and when it must end."""

    name: str
    pid: int
    started: float
    limit_s: float
    popen: subprocess.Popen | None = None
    returncode: int | None = None
    timed_out: bool = False

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.popen is not None:
            self.returncode = self.popen.poll()
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.returncode = -1
            return self.returncode
        if pid == 0:
            return None
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to the stage's process group, SIGKILL after ``grace_s``; reaps the stage."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            except PermissionError:
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass
            end = time.time() + grace_s
            while time.time() < end:
                if self.poll() is not None:
                    break
                time.sleep(0.1)
            if self.poll() is not None:
                break
        self.kill_group()

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the stage's process group (DataLoader workers of an ended or killed stage),
        so that nothing keeps holding the GPU or the cores."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _child(name: str, ctx: dict, result_path: Path, log_path: Path) -> int:
    """Body of a stage process: output to its log, results to its JSON, exit status 0 when it ended normally."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    rec = S.Recorder(result_path)
    try:
        S.set_threads(ctx)
        S.STAGES[name](ctx, rec)
        return 0
    except BaseException as exc:  # noqa: BLE001 - everything a stage raises is a result
        rec.fail(S._error_text(exc))
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def start_stage(name: str, ctx: dict, work: Path, limit_s: float, spawn: bool) -> Job:
    result_path, log_path = work / "stages" / f"{name}.json", work / "logs" / f"{name}.log"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ctx = {**ctx, "stage_deadline": time.time() + limit_s}
    if spawn:
        ctx_file = work / "stages" / f"{name}.ctx.json"
        ctx_file.write_text(json.dumps(ctx), encoding="utf-8")
        with open(log_path, "ab") as log:
            cmd = [sys.executable, str(Path(__file__)), "--stage", name, "--ctx-file", str(ctx_file)]
            popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, process_group=0, cwd=REPO)
        return Job(name, popen.pid, time.time(), limit_s, popen=popen)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the stage
        code = 1
        try:
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = _child(name, ctx, result_path, log_path)
        finally:
            os._exit(code)
    try:
        os.setpgid(pid, pid)  # also here, so that a stop right after the fork reaches the group
    except (PermissionError, ProcessLookupError):
        pass
    return Job(name, pid, time.time(), limit_s)


# ------------------------------------------------------------------------------------------ the report


@dataclass
class Report:
    """Everything the check knows, written as JSON and Markdown into ``out``."""

    out: Path
    work: Path
    mode: str
    budget_s: float
    started: float = field(default_factory=time.time)
    environment: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    finished: bool = False

    def stage_status(self, name: str) -> str | None:
        return self.stages.get(name, {}).get("status")

    def skip(self, name: str, why: str) -> None:
        self.stages[name] = {"status": "skipped", "why": why, "what": STAGE_INFO[name][1]}
        self.say(f"stage {name}: skipped ({why})")

    def running(self, job: Job) -> None:
        self.stages[job.name] = {"status": "running", "what": STAGE_INFO[job.name][1], "limit_s": round(job.limit_s),
                                 **self._partial(job.name)}

    def _partial(self, name: str) -> dict:
        path = self.work / "stages" / f"{name}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def finish_stage(self, job: Job) -> None:
        partial = self._partial(job.name)
        checks = partial.get("checks", {})
        failed = sorted(k for k, v in checks.items() if not v.get("ok"))
        if job.timed_out:
            status = "timeout"
        elif job.returncode == 0 and not failed and not partial.get("error"):
            status = "ok"
        else:
            status = "failed"
        wall = time.time() - job.started
        self.stages[job.name] = {
            "status": status, "what": STAGE_INFO[job.name][1], "wall_s": round(wall, 1),
            "limit_s": round(job.limit_s), "exit_code": job.returncode, "failed_checks": failed, **partial,
        }
        why = f" (failed checks: {', '.join(failed)})" if failed else ""
        self.say(f"stage {job.name}: {status} in {wall:.0f} s{why}")
        self._append_stage_log(job.name, status, wall)

    def say(self, line: str) -> None:
        stamp = f"[{time.time() - self.started:6.1f} s]"
        print(f"{stamp} {line}", flush=True)
        with open(self.out / "gpu_check.log", "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {line}\n")

    def _append_stage_log(self, name: str, status: str, wall: float) -> None:
        path = self.work / "logs" / f"{name}.log"
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        cut = len(data) > LOG_TAIL_BYTES
        with open(self.out / "gpu_check.log", "ab") as fh:
            fh.write(f"\n===== stage {name}: {status}, {wall:.0f} s{' (log tail)' if cut else ''} =====\n".encode())
            fh.write(data[-LOG_TAIL_BYTES:])
            fh.write(b"\n")

    def as_dict(self) -> dict:
        counts = {}
        for s in self.stages.values():
            counts[s["status"]] = counts.get(s["status"], 0) + 1
        return {
            "schema": 1, "mode": self.mode,
            "started": _dt.datetime.fromtimestamp(self.started, _dt.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.time() - self.started, 1), "budget_s": self.budget_s, "finished": self.finished,
            "summary": counts, "environment": self.environment, "stages": self.stages, "notes": self.notes,
        }

    def write(self) -> None:
        data = self.as_dict()
        S.atomic_write_text(self.out / "gpu_check.json", json.dumps(data, indent=1, default=S._jsonable))
        try:
            md = render_markdown(data)
        except Exception as exc:  # noqa: BLE001 - the JSON is written already; a rendering bug must not hide it
            md = f"# GPU check\n\nRendering failed ({type(exc).__name__}: {exc}); see gpu_check.json.\n"
        S.atomic_write_text(self.out / "gpu_check.md", md)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 and v != 0 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def render_markdown(data: dict) -> str:
    """``gpu_check.md``: the environment, one line per stage, and a table per kind of result."""
    env, stages = data.get("environment", {}), data.get("stages", {})
    host, dev = env.get("host", {}), stages.get("env", {}).get("result", {})
    lines = [f"# GPU check ({data['mode']})", "",
             f"Started {data['started']}, {data['elapsed_s']} s of a {data['budget_s']:.0f} s budget"
             f"{'' if data.get('finished') else ' (not finished: partial results)'}. Stages: "
             + ", ".join(f"{v} {k}" for k, v in sorted(data.get("summary", {}).items())) + ".", ""]
    lines += ["## Environment", "", "| | |", "|---|---|"]
    device = dev.get("device", {})
    rows = [
        ("GPU", f"{device.get('name')} ({device.get('memory_gib')} GiB, capability {device.get('capability')})"
         if device else (host.get("nvidia_smi") or ["none"])[0]),
        ("nvidia-smi", "; ".join(host.get("nvidia_smi") or ["-"])),
        ("torch / CUDA build / cuDNN / NCCL",
         f"{dev.get('torch')} / {dev.get('torch_cuda_build')} / {dev.get('cudnn')} / {dev.get('nccl', '-')}"),
        ("precision auto", dev.get("precision_auto")),
        ("bf16 matmul 8192^3", f"{dev['bf16_matmul_tflops']} TFLOP/s" if dev.get("bf16_matmul_tflops") else "-"),
        ("Python", f"{host.get('python')} ({host.get('executable')})"),
        ("CPU", f"{host.get('cpus')} x {host.get('cpu_model')}, {host.get('memory_gib')} GiB"),
        ("wheels", host.get("wheels")),
        ("medpretrain", f"{host.get('medpretrain')}, source digest {host.get('source_digest')} (git "
                        f"{host.get('git_commit')}{', uncommitted changes' if host.get('git_dirty') else ''})"),
        ("versions", ", ".join(f"{k} {v}" for k, v in (host.get("versions") or {}).items())),
    ]
    if env.get("preload_error"):
        rows.append(("import error", env["preload_error"].replace("\n", " ")))
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows] + [""]
    lines += ["## Stages", "", "| stage | status | s | limit s | what | failed checks / error |",
              "|---|---|---|---|---|---|"]
    for name, s in stages.items():
        detail = ", ".join(s.get("failed_checks") or [])
        if not detail:
            text = (s.get("error") or s.get("why") or "").strip()
            detail = text.splitlines()[-1] if text else ""
        lines.append(f"| {name} | {s.get('status')} | {_fmt(s.get('wall_s'))} | {_fmt(s.get('limit_s'))} | "
                     f"{s.get('what', '')} | {detail.replace('|', '/')[:200]} |")
    lines.append("")
    models = stages.get("models", {}).get("result", {}).get("models", {})
    if models:
        tol = stages["models"]["result"].get("tolerance", S.TOLERANCE)
        lines += ["## (a) bf16 autocast vs fp32, same weights (loss in fp32)", "",
                  f"Relative error of the logits and of the gradient vector, |loss difference| / loss, cosine of the "
                  f"gradients; fp32 repeat = the fp32 pass run twice (kernel non-determinism). Bounds: logits "
                  f"{tol['logits_rel']}, loss {tol['loss_rel']}, gradient cosine >= {tol['grad_cos_min']}.", "",
                  "| network | patch | batch | params M | outputs | logits rel | loss rel | loss all-autocast rel | "
                  "grad rel | grad cos | fp32 repeat grad rel | bf16 peak GB | within bounds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in models.items():
            if "error" in r:
                lines.append(f"| {name} | {r.get('patch')} | | | | error: {r['error'][:120]} | | | | | | | no |")
                continue
            lines.append(f"| {name} | {'x'.join(map(str, r['patch']))} | {r['batch']} | {r['parameters_m']} | "
                         f"{r['outputs']} | "
                         f"{_fmt(r['logits_rel'])} | {_fmt(r['loss_rel'])} | {_fmt(r['loss_all_autocast_rel'])} | "
                         f"{_fmt(r['grad_rel'])} | {_fmt(r['grad_cos'], 5)} | {_fmt(r['fp32_repeat_grad_rel'])} | "
                         f"{_fmt(r['bf16_peak_gb'])} | {'yes' if r['ok'] else 'NO'} |")
        lines.append("")
    methods = {k: v for k, v in stages.items() if k.startswith("pretrain-")}
    if methods:
        lines += ["## (a) Pretraining methods through the CLI", "",
                  "| method | status | network | patch | precision | steps | s/step | last loss |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in methods.items():
            r = s.get("result", {})
            tr = r.get("training", {})
            lines.append(f"| {name.removeprefix('pretrain-')} | {s.get('status')} | {r.get('model', '-')} | "
                         f"{'x'.join(map(str, r.get('patch') or [])) or '-'} | {r.get('precision', '-')} | "
                         f"{tr.get('steps_done', '-')} | {_fmt(tr.get('s_per_step'))} | "
                         f"{_fmt((r.get('last_logged') or {}).get('train/loss'))} |")
        lines.append("")
    ft = stages.get("finetune", {}).get("result", {})
    if ft:
        ev = (ft.get("evaluate") or {}).get("overall", {})
        lines += ["## (a) Fine-tuning, resume, evaluate, predict (CLI)", "", f"`{ft.get('command', '')}`", "",
                  f"- precision {ft.get('precision')}, {(ft.get('training') or {}).get('s_per_step', '-')} s/step; "
                  f"last loss {_fmt((ft.get('last_logged') or {}).get('train/loss'))}",
                  f"- crash simulated after {ft.get('resume_from')}; resumed run vs uninterrupted: "
                  f"{ft.get('resumed_vs_uninterrupted')}",
                  f"- evaluate: " + ", ".join(f"{k} {_fmt(v)}" for k, v in ev.items()),
                  f"- predict: {ft.get('predict')}", ""]
    ddp = stages.get("ddp", {})
    if ddp.get("result"):
        r = ddp["result"]
        lines += ["## (a) DDP", "", f"`{r.get('command', '')}`: {ddp.get('status')}, backend {r.get('backend')}, "
                  f"training {r.get('training')}", ""]
    tp = stages.get("throughput", {}).get("result", {})
    if tp.get("models"):
        lines += ["## (b) Training throughput (bf16 autocast, AdamW; synthetic batches, then the real loader)", "",
                  "| network | patch | batch 2 steps/s | batch 2 peak GB | largest batch | its samples/s | "
                  "its peak GB | limited by | loader b2 steps/s | b2 GPU idle | loader bmax steps/s | bmax GPU idle |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        loader = tp.get("loader") if isinstance(tp.get("loader"), dict) else {}
        for name, r in tp["models"].items():
            if "batch2" not in r:
                lines.append(f"| {name} | {r.get('patch')} | error: {str(r.get('error'))[:120]} | | | | | | | | | |")
                continue
            lb = r.get("largest_batch") or {}
            l2 = loader.get(f"{name}@2", {})
            lm = next((v for k, v in loader.items() if k.startswith(f"{name}@") and k != f"{name}@2"), {})
            at_largest = f" (b{lm.get('batch')})" if lm else ""
            lines.append(
                f"| {name} | {'x'.join(map(str, r['patch']))} | {_fmt(r['batch2']['steps_per_s'])} | "
                f"{_fmt(r['batch2']['peak_gb'])} | "
                f"{lb.get('batch', '-')} | {_fmt(lb.get('samples_per_s'))} | {_fmt(lb.get('peak_gb'))} | "
                f"{r.get('largest_batch_limited_by', r.get('error', '-'))} | "
                f"{_fmt(l2.get('steps_per_s'))} | {_fmt(l2.get('data_wait_fraction'))} | "
                f"{_fmt(lm.get('steps_per_s'))}{at_largest} | {_fmt(lm.get('data_wait_fraction'))} |")
        lines += ["", "GPU idle = share of the step time spent waiting for the next batch from the DataLoader "
                  f"({next(iter(loader.values()), {}).get('workers', '-') if loader else '-'} workers, "
                  "prepared la2018, flips); peak GB = CUDA allocations (peak RSS on CPU).", ""]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the driver (check.sh's overall limit, or Ctrl-C)."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def run_check(args) -> int:
    mode = "dry-run" if args.dry_run else "gpu"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="medpretrain-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget or float(os.environ.get("GPU_CHECK_BUDGET") or DEFAULT_BUDGET_S[mode])
    report = Report(out, work, mode, budget)
    # check.sh starts the log with the wheel installation; run directly, the check starts a fresh one.
    for stale in ("gpu_check.json", "gpu_check.md") + (() if args.append_log else ("gpu_check.log",)):
        (out / stale).unlink(missing_ok=True)
    if args.dry_run:
        sys.meta_path.insert(0, BlockImports({"SimpleITK"}))
        report.notes.append("dry run: SimpleITK imports are refused, as on the GPU machine")
    ctx = S.plan(mode, work, out, Path(args.data).resolve() if args.data else None)
    report.environment["host"] = host_environment()
    report.environment["work"] = str(work)
    report.say(f"GPU check ({mode}), budget {budget:.0f} s, results in {out}, scratch in {work}")
    report.write()

    t0 = time.time()
    error = preload()
    report.environment["preload_s"] = round(time.time() - t0, 1)
    if error:
        report.environment["preload_error"] = error
        report.say(f"importing the stack failed: {error}")
    spawn = args.spawn or cuda_initialised()
    if spawn and not args.spawn:
        report.notes.append("an import initialised CUDA in the driver: stages were started as fresh interpreters")
    report.environment["stage_processes"] = "spawned" if spawn else "forked"
    report.write()

    selected = set(args.stages.split(",")) if args.stages else set(STAGE_INFO)
    unknown = selected - set(STAGE_INFO)
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGE_INFO)}")
    deadline = report.started + budget
    parallel = args.parallel or ctx.get("parallel") or 1
    running: dict[str, Job] = {}
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        for group in GROUPS:
            pending = [n for n in group if n in selected]
            last_write = 0.0
            while pending or running:
                while pending and len(running) < parallel:
                    name = pending.pop(0)
                    blocked = [n for n in NEEDS.get(name, ()) if n in selected and report.stage_status(n) != "ok"]
                    left = deadline - time.time() - RESERVE_S
                    if blocked:
                        report.skip(name, f"needs stage {', '.join(blocked)} to pass")
                    elif left < MIN_STAGE_S:
                        report.skip(name, f"out of time ({max(left, 0):.0f} s left of the budget)")
                    else:
                        limit = min(STAGE_INFO[name][0] * args.limit_scale, left)
                        job = start_stage(name, ctx, work, limit, spawn)
                        running[name] = job
                        report.say(f"stage {name}: started (limit {limit:.0f} s)")
                        report.running(job)
                time.sleep(0.25)
                for name, job in list(running.items()):
                    if job.poll() is None and time.time() - job.started > job.limit_s:
                        job.timed_out = True
                        job.stop()
                    if job.poll() is not None:
                        job.kill_group()
                        del running[name]
                        report.finish_stage(job)
                        report.write()
                if time.time() - last_write > 5:
                    for job in running.values():
                        report.running(job)
                    report.write()
                    last_write = time.time()
        report.finished = True
    except Interrupted as exc:
        report.notes.append(f"the check was stopped ({exc}) with stage(s) {', '.join(running) or 'none'} running")
        report.say(f"stopped by {exc}")
        for job in running.values():
            job.timed_out = True
            job.stop(grace_s=2.0)
            report.finish_stage(job)
        running.clear()
    finally:
        for job in running.values():  # an unexpected error in the driver: leave nothing behind on the GPU
            job.stop(grace_s=2.0)
        report.write()
    summary = report.as_dict()["summary"]
    report.say("done: " + ", ".join(f"{v} {k}" for k, v in sorted(summary.items())))
    return 0 if set(summary) <= {"ok"} else 1


def stage_entry(args) -> int:
    """A stage started as a fresh interpreter (``--spawn``, or when the driver's imports initialised CUDA)."""
    ctx = json.loads(Path(args.ctx_file).read_text(encoding="utf-8"))
    if ctx["mode"] == "dry-run":
        sys.meta_path.insert(0, BlockImports({"SimpleITK"}))
    work = Path(ctx["work"])
    rec = S.Recorder(work / "stages" / f"{args.stage}.json")
    try:
        S.set_threads(ctx)
        S.STAGES[args.stage](ctx, rec)
        return 0
    except BaseException as exc:  # noqa: BLE001
        rec.fail(S._error_text(exc))
        traceback.print_exc()
        return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The GPU check (see benchmarks/gpu/README.md).")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same stages, for the test suite")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu-check"),
                        help="results folder (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--work", help="scratch folder (default: a new folder under the system's temp folder)")
    parser.add_argument("--data", help="raw la2018 subset (default: .gpu-data/la2018; dry run: a 2+1 case copy)")
    parser.add_argument("--budget", type=float, help="seconds for all stages (default: $GPU_CHECK_BUDGET, else "
                        f"{DEFAULT_BUDGET_S['gpu']:.0f} on the GPU, {DEFAULT_BUDGET_S['dry-run']:.0f} in the dry run)")
    parser.add_argument("--parallel", type=int, help="stages of one group side by side (default: 4 GPU, 3 dry run)")
    parser.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGE_INFO)}")
    parser.add_argument("--limit-scale", type=float, default=1.0, help="multiply every stage's time limit")
    parser.add_argument("--spawn", action="store_true", help="start stages as fresh interpreters instead of forks")
    parser.add_argument("--append-log", action="store_true", help="append to OUT/gpu_check.log (check.sh began it)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--ctx-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Before torch is imported: torch.cuda.is_available() then asks NVML and leaves CUDA uninitialised, so that
    # forked stages can still use the GPU.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if args.stage:
        return stage_entry(args)
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
