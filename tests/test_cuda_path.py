"""The CUDA path, as far as a CPU can check it: loader settings, CUDA math settings, float32 losses under
autocast, augmentation on the training device, where sliding-window inference keeps a volume, and resumes of
runs recorded before a setting existed. What needs a GPU is listed in benchmarks/gpu/README.md."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import default_collate

from medpretrain.config import AugmentConfig, FinetuneConfig, InferenceConfig
from medpretrain.data.cache import PreparedData, prepare_dataset
from medpretrain.data.preprocess import PreprocessConfig
from medpretrain.data.sampling import PatchAugmenter, PatchDataset
from medpretrain.engine.finetune import augment_on_device
from medpretrain.engine.job import StepDataModule
from medpretrain.engine.module import SegmentationModule
from medpretrain.engine.device import configure_cuda_math, cuda_environment, cuda_memory_gb, lightning_deterministic
from medpretrain.engine.trainer import check_same_config
from medpretrain.errors import ConfigError
from medpretrain.evaluation.inference import volume_device
from medpretrain.synthetic.demo_data import make_demo_dataset

PATCH = (32, 32, 16)
HEAVY = AugmentConfig(flip_prob=0.5, rotate90_prob=0.5, affine_prob=0.5, intensity_prob=0.5, noise_prob=0.5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedData:
    root = tmp_path_factory.mktemp("cuda-path")
    raw = make_demo_dataset(root / "raw", n_cases=3, size=(40, 36, 20), seed=1)
    return prepare_dataset(raw, root / "prepared", PreprocessConfig(modality="MR", spacing=(1.5, 1.5, 2.0)),
                           workers=1, seed=0, progress=False)


def _loader(dataset, cfg, device: str):
    dm = StepDataModule(dataset, cfg)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=0,
                                 strategy=SimpleNamespace(root_device=torch.device(device)))
    return dm.train_dataloader()


def test_loader_keeps_workers_and_pins_only_for_cuda(prepared):
    ds = PatchDataset(prepared, prepared.split("train"), PATCH)
    cfg = FinetuneConfig(patch=PATCH, num_workers=2)
    cpu = _loader(ds, cfg, "cpu")
    assert cpu.persistent_workers and not cpu.pin_memory and cpu.num_workers == 2
    assert _loader(ds, cfg, "cuda").pin_memory  # only the flag: nothing is pinned until iterated
    none = _loader(ds, cfg.model_copy(update={"num_workers": 0}), "cpu")
    assert not none.persistent_workers  # DataLoader refuses persistent workers without workers


def test_cuda_settings_are_chosen_per_accelerator(monkeypatch):
    assert lightning_deterministic(True, "cpu") is True and lightning_deterministic(False, "gpu") is False
    # On CUDA, DiceCE's cross-entropy (nll_loss2d) has no deterministic kernel: warn instead of stopping.
    assert lightning_deterministic(True, "gpu") == "warn"
    assert configure_cuda_math("cpu", False) == {} and cuda_memory_gb(torch.device("cpu")) == {}
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cuda_environment("cpu", True)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    cuda_environment("gpu", True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    cuda_environment("cuda", True)  # the user's value is kept
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_cpu_auto_precision_can_be_pinned_by_the_environment(prepared, tmp_path, monkeypatch):
    """``MEDPRETRAIN_CPU_AUTO_PRECISION`` decides what ``precision: auto`` trains with on a CPU (a comparison begun
    in fp32 continues in fp32 on a CPU with native bf16); an explicit precision and a bad value are not silent."""
    from medpretrain.api import finetune
    from medpretrain.engine.device import resolve_precision
    from medpretrain.engine.run_folder import run_precision
    from medpretrain.errors import ConfigError
    from medpretrain.evaluation.inference import load_trained_model

    for pinned in ("32-true", "bf16-mixed"):
        monkeypatch.setenv("MEDPRETRAIN_CPU_AUTO_PRECISION", pinned)
        assert resolve_precision("auto", "cpu") == pinned
        assert resolve_precision("16-mixed", "cpu") == "16-mixed"
    tiny = dict(model="unet", model_options={"features": (4, 4, 8, 8, 16, 4)}, steps=1, patch=PATCH, batch=1,
                num_workers=0, accelerator="cpu")
    out = finetune(prepared.root, tmp_path / "pinned", FinetuneConfig(**tiny, precision="auto"))
    assert run_precision(json.loads((out / "run.json").read_text(encoding="utf-8"))) == "bf16-mixed"  # as pinned
    cpu = torch.device("cpu")
    assert load_trained_model(out, device=cpu).precision == "bf16-mixed"  # scored as `auto` says here
    # a network trained in fp32 is scored in fp32 whatever `auto` means on the scoring machine
    fp32 = finetune(prepared.root, tmp_path / "fp32", FinetuneConfig(**tiny, precision="32-true"))
    assert load_trained_model(fp32, device=cpu).precision == "32-true"
    monkeypatch.setenv("MEDPRETRAIN_CPU_AUTO_PRECISION", "fp32")
    with pytest.raises(ConfigError, match=r"MEDPRETRAIN_CPU_AUTO_PRECISION='fp32'.*32-true, bf16-mixed"):
        resolve_precision("auto", "cpu")


def test_augmentation_placement_resolves_from_the_accelerator():
    assert not augment_on_device(FinetuneConfig(accelerator="cpu"))
    assert augment_on_device(FinetuneConfig(accelerator="cpu", augment={"on": "device"}))
    assert not augment_on_device(FinetuneConfig(accelerator="gpu", augment={"on": "workers"}))
    assert augment_on_device(FinetuneConfig(accelerator="gpu"))
    assert not augment_on_device(FinetuneConfig(accelerator="gpu", augment={"enabled": False}))


@pytest.mark.parametrize("aug", [AugmentConfig(), HEAVY], ids=["flips", "heavy"])
def test_device_augmentation_equals_worker_augmentation(prepared, aug):
    ids = prepared.split("train")
    workers = PatchDataset(prepared, ids, PATCH, seed=4, augment=aug)
    device = PatchDataset(prepared, ids, PATCH, seed=4, augment=aug, augment_on_device=True)
    idx = range(6)
    raw = default_collate([device[i] for i in idx])
    # What travels: the raw patch, uint8 labels, the patch's augmentation seed and background.
    assert raw["label"].dtype == torch.uint8 and raw["aug_seed"].shape == (6,) and raw["fill"].shape == (6, 1)
    after = PatchAugmenter(aug, PATCH)(raw)
    before = default_collate([workers[i] for i in idx])
    assert set(after) == {"image", "label"} and after["label"].dtype == torch.int64
    assert torch.equal(after["image"], before["image"]) and torch.equal(after["label"], before["label"])


def test_module_applies_its_batch_transform_and_takes_uint8_labels(prepared):
    module = SegmentationModule(FinetuneConfig(patch=PATCH, model_options={"features": (4, 4, 8, 8, 16, 4)}), 1,
                                prepared.num_classes)
    ds = PatchDataset(prepared, prepared.split("train"), PATCH, seed=0, augment=AugmentConfig(),
                      augment_on_device=True)
    batch = default_collate([ds[i] for i in range(2)])
    assert module.on_after_batch_transfer(dict(batch), 0) == batch  # no transform: unchanged
    module.batch_transform = PatchAugmenter(AugmentConfig(), PATCH)
    moved = module.on_after_batch_transfer(dict(batch), 0)
    assert moved["label"].dtype == torch.int64
    # uint8 and int64 label maps give the same loss.
    with torch.no_grad():
        a = module.compute_loss(batch["image"], batch["label"])
        b = module.compute_loss(batch["image"], batch["label"].long())
    assert torch.equal(a, b)


def test_loss_is_float32_under_autocast(prepared):
    torch.manual_seed(0)
    module = SegmentationModule(FinetuneConfig(patch=PATCH, model_options={"features": (4, 4, 8, 8, 16, 4)}), 1,
                                prepared.num_classes)
    ds = PatchDataset(prepared, prepared.split("train"), PATCH, seed=0)
    batch = default_collate([ds[i] for i in range(2)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.compute_loss(batch["image"], batch["label"])
        logits = module.model(batch["image"])
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    # Exactly the float32 loss of the bf16 logits: no part of it ran in bf16.
    assert torch.equal(loss, module.loss_fn(logits.float(), batch["label"]))


def test_finetune_with_augmentation_on_the_device_equals_workers(prepared, tmp_path):
    from medpretrain.api import finetune

    def run(on: str, workers: int):
        cfg = FinetuneConfig(model="unet", model_options={"features": (4, 4, 8, 8, 16, 4)}, steps=3, patch=PATCH,
                             batch=2, checkpoint_every=2, num_workers=workers, precision="32-true", deterministic=True,
                             augment={"on": on, "flip_prob": 0.5, "intensity_prob": 0.5})
        out = finetune(prepared.root, tmp_path / f"{on}-{workers}", cfg)
        return torch.load(out / "model.pt", map_location="cpu", weights_only=False)["state_dict"]

    a, b = run("workers", 0), run("device", 1)  # one persistent worker across the two data epochs
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sliding_window_volume_placement():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert volume_device((512, 512, 600), 1, 14, cpu) == cpu
    gb = 10**9
    # 512x512x600 with 14 classes: (1 + 2*14 + 1) * 4 bytes per voxel = 18.9 GB beside the windows.
    assert volume_device((512, 512, 600), 1, 14, gpu, free_bytes=100 * gb) == gpu
    assert volume_device((512, 512, 600), 1, 14, gpu, free_bytes=30 * gb) == cpu
    assert volume_device((512, 512, 600), 1, 14, gpu, "model", free_bytes=1) == gpu
    assert volume_device((96, 96, 96), 1, 2, gpu, "cpu", free_bytes=100 * gb) == cpu
    assert InferenceConfig().volume_device == "auto"


def test_resume_ignores_settings_added_since_the_run_started(tmp_path):
    run_file = tmp_path / "run.json"
    old = FinetuneConfig().model_dump(mode="json")
    del old["augment"]["on"], old["inference"]["volume_device"]  # a run written before these settings existed
    run_file.write_text(json.dumps({"config": old}), encoding="utf-8")
    check_same_config(run_file, FinetuneConfig().model_dump(mode="json"))
    changed = FinetuneConfig(augment={"flip_prob": 0.2}).model_dump(mode="json")
    with pytest.raises(ConfigError, match="augment"):
        check_same_config(run_file, changed)
