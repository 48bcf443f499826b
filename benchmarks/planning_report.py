"""Plans for real datasets (issue 22): la2018, BTCV and a thick-slice MR set, for three networks, on 2 CPU threads
and on 80 GB / 140 GB GPUs (computed, not run), beside the fixed default patch the tool used before planning; for
DynUNet also the per-stage strides and kernels nnU-Net's rule gives (thick slices: no pooling along Z at the top).

    python benchmarks/planning_report.py --shared ../shared --work runs/planning --out docs/results/planning

Prepares each dataset once at the spacing nnU-Net's rule gives (the median; la2018 at its 1.25 mm), reusing
``WORK/<name>`` when it exists, then writes ``OUT/plans.json`` (every plan and fingerprint) and ``OUT/plans.md``.
Step times and memory are the planner's estimates (``medpretrain.planning``), not timings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from _common import cpu_model

from medpretrain.data.cache import PreparedData, prepare
from medpretrain.data.preprocess import PreprocessConfig
from medpretrain.planning import Budget, Plan, model_cost, padding_fraction, plan_training, write_fingerprint

MODELS = ("unet", "dynunet", "swinunetr-small")
BUDGETS = {"cpu, 2 threads, <= 2 s/step": Budget("cpu", threads=2, step_seconds=2.0),
           "gpu h200, 80 GB": Budget("gpu", gpu="h200", gpu_memory_gb=80.0),
           "gpu h200, 140 GB": Budget("gpu", gpu="h200", gpu_memory_gb=140.0)}
DEFAULT_PATCH = (64, 64, 48)  # FinetuneConfig's fixed default before planning


def _prepare(shared: Path, work: Path) -> dict[str, PreparedData]:
    data = {}
    specs = {
        "la2018": dict(dataset=shared / "data" / "la2018", cfg=PreprocessConfig(spacing=(1.25, 1.25, 1.25), modality="MR")),
        "btcv": dict(dataset=shared / "data" / "btcv", cfg=PreprocessConfig(modality="CT")),
    }
    pool = json.loads((shared / "data" / "pool" / "pool.json").read_text(encoding="utf-8"))
    thick = [{"image": str((shared / "data" / "pool" / e["file"]).resolve()), "modality": e["modality"]}
             for e in pool if e.get("spacing") and max(e["spacing"]) / min(e["spacing"]) > 3 and e["modality"] == "MR"]
    work.mkdir(parents=True, exist_ok=True)
    (work / "thick-mr.json").write_text(json.dumps(thick, indent=1), encoding="utf-8")
    specs["thick-slice MR (pool)"] = dict(pool=work / "thick-mr.json", cfg=PreprocessConfig(modality="MR"))
    for name, spec in specs.items():
        out = work / name.split()[0]
        if not (out / "manifest.json").exists():
            prepare(dataset=spec.get("dataset"), pool=spec.get("pool"), out=out, cfg=spec["cfg"], workers=2,
                    progress=False)
        data[name] = PreparedData(out)
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--work", type=Path, default=Path("runs/planning"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/planning"))
    args = ap.parse_args(argv)
    data = _prepare(args.shared, args.work)
    results = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
               "cpu": cpu_model(), "datasets": {}, "costs": {m: asdict(model_cost(m)) for m in MODELS}}
    md = ["# Plans (computed, not run)", "",
          "Patch and batch `medpretrain plan` chooses, its estimated step time and training memory, and the share of a "
          "patch that is padding, against the fixed default patch 64x64x48 (batch 2) used before planning. "
          "Estimates come from FLOPs and saved activations per voxel measured once per network on the CPU, with "
          "per-thread CPU rates calibrated on the committed step timings and 25% of an H200's bf16 peak "
          "(`src/medpretrain/planning.py`). DynUNet's strides and kernels (one XxYxZ per stage, the first stage's "
          "stride 1) are nnU-Net's rule on the spacing and the patch; the other networks down-sample isotropically.",
          ""]
    for name, prepared in data.items():
        fp = write_fingerprint(prepared)
        entry = {"fingerprint": {k: v for k, v in fp.items() if k != "shapes"}, "plans": []}
        md += [f"## {name}", "",
               f"{fp['cases']} cases; median original spacing {_x(fp['original_spacing']['median'], '.3g')} mm "
               f"(anisotropy {fp['anisotropy']:.1f}); prepared at {_x(fp['prepared_spacing'], '.3g')} mm, median "
               f"shape {_x(fp['prepared_shape']['median'], '.0f')} voxels.", "",
               "| network | budget | patch | batch | padding | est. step (s) | est. memory (GB) | default 64x64x48: "
               "padding, est. step (s) | strides / kernels | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
        for model in MODELS:
            for label, budget in BUDGETS.items():
                plan: Plan = plan_training(fp, model, budget, prepared.in_channels, max(2, prepared.num_classes))
                cost = model_cost(model)
                default_ok = True
                try:
                    from medpretrain.models import get_spec

                    get_spec(model).check_patch(DEFAULT_PATCH)
                except Exception:
                    default_ok = False
                default = (f"{100 * padding_fraction(fp['shapes'], DEFAULT_PATCH):.0f}%, "
                           f"{budget.step_time(cost, DEFAULT_PATCH, 2):.3g}") if default_ok else "not a valid patch"
                entry["plans"].append({"model": model, "budget": label, **asdict(plan),
                                       "default_patch_padding": padding_fraction(fp["shapes"], DEFAULT_PATCH),
                                       "default_patch_step_seconds": budget.step_time(cost, DEFAULT_PATCH, 2)})
                topology = (f"{_stages(plan.strides)} / {_stages(plan.kernels)}" if plan.strides is not None
                            else "isotropic")
                md.append(f"| {model} | {label} | {_x(plan.patch, 'd')} | {plan.batch} | "
                          f"{100 * plan.padding_fraction:.0f}% | {plan.step_seconds:.3g} | {plan.memory_gb:.1f} | "
                          f"{default} | {topology} | {'; '.join(plan.notes)} |")
        md.append("")
        results["datasets"][name] = entry
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plans.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (args.out / "plans.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


def _x(values, fmt: str) -> str:
    return "x".join(format(v, fmt) for v in values)


def _stages(rows) -> str:
    return " ".join(_x(r, "d") for r in rows)


if __name__ == "__main__":
    raise SystemExit(main())
