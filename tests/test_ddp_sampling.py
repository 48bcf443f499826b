"""Under DDP every rank reads its own samples: two gloo processes through the real trainer and data module
never read the same sample index, and together they read every index of the run exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset

STEPS, EPOCH_STEPS, BATCH, WORLD = 6, 3, 2, 2


class IndexDataset(Dataset):
    """Sample ``i`` is its own index (a stand-in for PatchDataset, whose patch is a function of the index)."""

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(index), "x": torch.full((4,), float(index % 7))}


class Recorder(pl.LightningModule):
    """A one-layer model that records which sample indices its rank trained on."""

    def __init__(self, out_dir: Path):
        super().__init__()
        self.out_dir = out_dir
        self.layer = torch.nn.Linear(4, 1)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen += [int(i) for i in batch["index"]]
        return self.layer(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_end(self):
        path = self.out_dir / f"rank{self.global_rank}.json"
        path.write_text(json.dumps({"world": self.trainer.world_size, "seen": self.seen}), encoding="utf-8")


def test_two_gloo_ranks_read_disjoint_samples_that_cover_the_run(tmp_path):
    from medpretrain.config import TrainingConfig
    from medpretrain.engine.job import StepDataModule
    from medpretrain.engine.trainer import build_trainer

    # ddp_fork: the two processes are forked from this test (the `ddp` launcher would re-run pytest's command line,
    # ddp_spawn re-imports torch in each: 3x slower); trainer, data module and sampler are those of every job.
    cfg = TrainingConfig(steps=STEPS, checkpoint_every=EPOCH_STEPS, batch=BATCH, num_workers=0, accelerator="cpu",
                         devices=WORLD, strategy="ddp_fork", precision="32-true")
    trainer = build_trainer(tmp_path / "run", max_steps=STEPS, epoch_steps=EPOCH_STEPS, precision="32-true",
                            accelerator="cpu", devices=WORLD, num_nodes=1, strategy="ddp_fork", deterministic=False)
    trainer.fit(Recorder(tmp_path), datamodule=StepDataModule(IndexDataset(), cfg))

    seen = {}
    for rank in range(WORLD):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text(encoding="utf-8"))
        assert record["world"] == WORLD
        seen[rank] = record["seen"]
        assert len(seen[rank]) == len(set(seen[rank])) == STEPS * BATCH  # two data epochs, no repeat
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(STEPS * BATCH * WORLD))
    # Step s of rank r reads [(s * world + r) * batch, ...): the layout resume and the design notes rely on.
    for rank, indices in seen.items():
        assert indices == [(s * WORLD + rank) * BATCH + b for s in range(STEPS) for b in range(BATCH)]
