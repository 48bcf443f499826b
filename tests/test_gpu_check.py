"""The GPU check (benchmarks/gpu/): its dry run on CPU, the size of what travels, the wheel set, its time
limits, and that nothing on its path imports SimpleITK (which does not travel)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))

import check  # noqa: E402
import stages  # noqa: E402
import travel  # noqa: E402

# The GPU machine's Python packages (/work/.library/device/KINDS.md, "Python packages already there", read on
# 2026-11-17), normalised: what the check need not carry.
GPU_MACHINE_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# Left behind on purpose: its wheel alone is ~50 MB of the 64 MiB; nothing on the check's path imports it.
NOT_CARRIED = {"simpleitk"}
# The GPU machine's interpreter, for evaluating the wheels' requirement markers.
GPU_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1))


def _wheel_list() -> set[str]:
    names = set()
    for line in (GPU / "wheels.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(_requirement_name(line))
    return names


# ------------------------------------------------------------------------------------------ fast tests


def test_the_plan_covers_every_registered_network_method_and_stage():
    from medpretrain.methods import list_methods
    from medpretrain.models import get_spec, list_models

    registered = {s.name for s in list_models()}
    # A network registered later needs its preset patch here, or the check runs it at a guessed one.
    assert set(stages.MODEL_PATCH) == registered
    for name, patch in {**stages.MODEL_PATCH, **stages.THROUGHPUT_PATCH}.items():
        get_spec(name).check_patch(patch)
    assert set(stages.METHOD_ORDER) == {m.name for m in list_methods()}
    assert set(stages.STAGES) == set(check.STAGE_INFO)
    grouped = [name for group in check.GROUPS for name in group]
    assert sorted(grouped) == sorted(check.STAGE_INFO) and len(grouped) == len(set(grouped))
    dry = stages.plan("dry-run", Path("/tmp/w"), Path("/tmp/o"))
    for name, entry in dry["models"].items():
        get_spec(name).check_patch(stages.model_entry(entry)[0])
    gpu = stages.plan("gpu", Path("/tmp/w"), Path("/tmp/o"), cpu_count=16)
    assert gpu["device"] == "cuda" and gpu["method"]["steps"] == 20 and gpu["finetune"]["steps"] == 30
    assert 8 <= gpu["throughput"]["loader_workers"] <= 14


@pytest.mark.parametrize("mode", ["gpu", "dry-run"])
def test_the_method_settings_of_the_plan_are_valid_configs(mode):
    """What the pretraining stages pass (preset, step budget, YAML keys) is accepted by every method, so the one
    GPU call is not lost to a refused option."""
    from medpretrain.engine.pretrain import pretrain_config
    from medpretrain.matching.sam import MatcherConfig

    m = stages.plan(mode, Path("/tmp/w"), Path("/tmp/o"), cpu_count=16)["method"]
    for method in stages.METHOD_ORDER:
        overrides = {"steps": m["steps"], "batch": m["batch"], "checkpoint_every": m["checkpoint_every"],
                     "num_workers": m["num_workers"], **m["config"].get(method, {})}
        if method == "alice":
            overrides.update(matcher="sam", matcher_run="/tmp/matcher")
        cfg = pretrain_config(method, preset=m["preset"], overrides=overrides)
        assert cfg.steps == m["steps"]
    MatcherConfig(**{"steps": m["matcher_steps"], **m.get("matcher_config", {})})


def test_wheel_list_covers_every_dependency_the_gpu_machine_lacks():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    missing = {_requirement_name(d) for d in deps} - GPU_MACHINE_PACKAGES - NOT_CARRIED
    assert missing <= _wheel_list(), f"add {sorted(missing - _wheel_list())} to benchmarks/gpu/wheels.txt"


def test_fetched_wheels_are_the_list_and_need_nothing_else():
    from packaging.markers import Marker
    from packaging.requirements import Requirement

    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if not wheels:
        pytest.skip(".whl/ has not been fetched (bash benchmarks/gpu/fetch_wheels.sh)")
    names = [_norm(w.name.split("-")[0]) for w in wheels]
    assert len(names) == len(set(names)), f"two versions of one distribution in .whl stop the install: {names}"
    assert set(names) == _wheel_list(), "re-run benchmarks/gpu/fetch_wheels.sh after editing wheels.txt"
    for wheel in wheels:
        assert "cp312" in wheel.name or "py3-none-any" in wheel.name, f"{wheel.name} is not for the GPU's Python 3.12"
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            lines = zf.read(meta).decode("utf-8").splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not Marker(str(req.marker)).evaluate(GPU_MARKERS):
                continue  # an extra, or another Python
            name = _norm(req.name)
            assert name in set(names) | GPU_MACHINE_PACKAGES, f"{wheel.name} needs {name}: add it to wheels.txt"


def test_travelling_set_stays_under_64_mib():
    sizes = travel.travelling_set()
    if not sizes[".whl"]:
        pytest.skip(".whl/ has not been fetched (bash benchmarks/gpu/fetch_wheels.sh), so its size is unknown")
    if not sizes[".gpu-data"]:
        from make_data import DEFAULT_SOURCE, DEFAULT_TEST, DEFAULT_TRAIN, plan_subset

        if not (DEFAULT_SOURCE / "splits.json").is_file():
            pytest.skip(".gpu-data/ is absent and ../shared/data/la2018 too, so the data's size is unknown")
        sizes[".gpu-data"] = sum(size for _, size in plan_subset(DEFAULT_SOURCE, DEFAULT_TRAIN, DEFAULT_TEST)["files"])
        sizes["total"] = sizes["tree"] + sizes[".whl"] + sizes[".gpu-data"]
    report = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
    assert sizes["total"] < travel.LIMIT_BYTES, f"a run call may send 64 MiB: {report}; carry fewer la2018 cases " \
        "(make_data.py --train/--test) or move large files out of the tree"


def test_make_data_copies_a_consistent_subset(tmp_path):
    from make_data import make_subset

    from medpretrain.synthetic.demo_data import make_demo_dataset

    src = make_demo_dataset(tmp_path / "src", n_cases=6, size=(20, 20, 16), seed=0)
    out = make_subset(src, tmp_path / "out", n_train=2, n_test=1)
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    dataset = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert len(splits["train"]) == 2 and len(splits["test"]) == 1 and dataset["numTraining"] == 3
    assert len(dataset["training"]) == 3 and len(list((out / "imagesTr").iterdir())) == 3
    pool = json.loads((out / "pool.json").read_text(encoding="utf-8"))
    assert [e["image"] for e in pool] == [f"imagesTr/{c}_0000.nii.gz" for c in splits["train"]]
    with pytest.raises(ValueError, match="lower --test"):
        make_subset(src, tmp_path / "too-many", n_train=1, n_test=5)


def _sleepy_stage(ctx, rec):
    rec.set("measured", 42)
    time.sleep(120)


def test_a_stage_past_its_limit_is_stopped_and_keeps_what_it_wrote(tmp_path, monkeypatch):
    monkeypatch.setitem(stages.STAGES, "env", _sleepy_stage)
    report = check.Report(tmp_path / "out", tmp_path / "work", "dry-run", 60)
    report.out.mkdir()
    job = check.start_stage("env", {"mode": "dry-run"}, report.work, limit_s=1.5, spawn=False)
    while job.poll() is None and time.time() - job.started < job.limit_s:
        time.sleep(0.1)
    assert job.poll() is None, "the stage should still be sleeping at its limit"
    job.timed_out = True
    job.stop(grace_s=2.0)
    assert job.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(job.pid, 0)  # nothing of the stage's process group is left
    report.finish_stage(job)
    report.write()
    data = json.loads((report.out / "gpu_check.json").read_text(encoding="utf-8"))
    assert data["stages"]["env"]["status"] == "timeout"
    assert data["stages"]["env"]["result"] == {"measured": 42}
    assert "| env | timeout |" in (report.out / "gpu_check.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ SimpleITK


SIMPLEITK_PROBE = textwrap.dedent("""
    import sys
    import medpretrain.cli, medpretrain.api, medpretrain.engine.finetune, medpretrain.engine.pretrain
    import medpretrain.evaluation.inference, medpretrain.evaluation.report, medpretrain.matching.sam
    from medpretrain.methods import list_methods
    list_methods()
    from medpretrain.data.cache import prepare_dataset
    from medpretrain.data.io import read_image
    from medpretrain.data.preprocess import PreprocessConfig
    from medpretrain.synthetic.demo_data import make_demo_dataset
    raw = make_demo_dataset(sys.argv[1] + "/raw", n_cases=2, size=(20, 20, 16), seed=0)
    prepare_dataset(raw, sys.argv[1] + "/prepared", PreprocessConfig(modality="MR"), progress=False)
    read_image(next((raw / "imagesTr").iterdir()))
    print("SimpleITK" in sys.modules)
""")


def test_simpleitk_is_not_imported_by_the_cli_training_or_nifti_paths(tmp_path):
    """SimpleITK does not travel to the GPU machine: importing the CLI, training, evaluation and prediction, and
    preparing NIfTI data must not import it (finetune, evaluate and predict run under an import blocker in
    the dry run below)."""
    proc = subprocess.run([sys.executable, "-c", SIMPLEITK_PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False", "a module on the GPU check's path imports SimpleITK"


# ------------------------------------------------------------------------------------------ the dry run


@pytest.mark.slow
def test_dry_run_runs_every_stage_on_cpu(tmp_path):
    """``check.sh --dry-run``: every stage of the GPU check on CPU with tiny sizes (about 80 s on 2 busy
    cores), SimpleITK refused; the three result files written."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    t0 = time.time()
    proc = subprocess.run(["bash", str(GPU / "check.sh"), "--dry-run", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    wall = time.time() - t0
    assert (out / "gpu_check.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    bad = {name: (s["status"], s.get("failed_checks"), (s.get("error") or s.get("why") or "").strip()[-600:])
           for name, s in data["stages"].items() if s["status"] != "ok"}
    assert not bad, f"stages not ok after {wall:.0f} s: {bad}"
    assert set(data["stages"]) == set(check.STAGE_INFO) and data["finished"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "gpu_check.md").read_text(encoding="utf-8")
    assert "## (a) bf16 autocast vs fp32" in md and "## (b) Training throughput" in md
    assert "===== stage finetune: ok" in (out / "gpu_check.log").read_text(encoding="utf-8")
    assert data["stages"]["finetune"]["result"]["predict"], "predict wrote no label map"
    assert any("SimpleITK" in n for n in data["notes"])
