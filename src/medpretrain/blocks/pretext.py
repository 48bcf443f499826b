"""Was the pretext task learnt? Its loss against a trivial baseline and a perfect prediction.

A pretraining's final loss means little alone: a Volume Fusion loss of 1.1 is "nothing learnt" when predicting
the class prior everywhere also scores 1.1. Each method states, for the loss terms it logs, the loss of a
trivial prediction (one that needs no understanding of the image: the class prior everywhere, the mean
intensity, a constant position) and of a perfect one, both measured on samples of the run's own data with the
run's own loss function. The fraction of that range the final loss covers,
``(trivial - final) / (trivial - perfect)``, is the "fraction learnt": 0 = no better than the trivial guess,
1 = perfect. It is written into the pretraining's ``run.json`` and every benchmark report.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

# Samples drawn for the baselines come from indices far past any run's training range (a sample is a pure
# function of its index): the same distribution as training, not the very samples trained on.
BASELINE_INDEX = 10**12


@dataclass
class PretextBaseline:
    """The two ends of one logged loss term's range.

    Attributes:
        term: the logged name (``train/<term>`` in the run's CSV log).
        trivial: loss of the trivial prediction, averaged over the samples.
        perfect: loss of a perfect prediction (0 for a regression; the loss at one-hot logits for Dice/CE).
        trivial_is: what the trivial prediction is, in words.
        samples: how many samples were averaged.
    """

    term: str
    trivial: float
    perfect: float
    trivial_is: str
    samples: int


def baseline_samples(dataset, n: int) -> list[dict]:
    """``n`` samples of a pretraining dataset, from indices past any training run's range."""
    return [dataset[BASELINE_INDEX + i] for i in range(n)]


@torch.no_grad()
def segmentation_baseline(samples: Iterable[dict], loss_fn: Callable, num_classes: int, term: str = "loss",
                          batch: int = 2, sharpness: float = 30.0) -> PretextBaseline:
    """Baselines of a segmentation pretext task (Volume Fusion, AVS-DB): ``trivial`` predicts the class prior
    (class frequencies over the samples) at every voxel; ``perfect`` the label map itself (logits
    ``sharpness * one_hot``). Both are scored with ``loss_fn`` over batches of ``batch`` samples, as in training."""
    samples = list(samples)
    labels = [s["label"].long() for s in samples]
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for lab in labels:
        counts += torch.bincount(lab.flatten(), minlength=num_classes)[:num_classes].double()
    prior = (counts / counts.sum()).clamp_min(1e-8).float()
    trivial, perfect, n = 0.0, 0.0, 0
    for i in range(0, len(labels), batch):
        lab = torch.stack(labels[i:i + batch])  # (B, 1, X, Y, Z)
        shape = (lab.shape[0], num_classes, *lab.shape[2:])
        prior_logits = prior.log().view(1, -1, 1, 1, 1).expand(shape).contiguous()
        one_hot = torch.zeros(shape).scatter_(1, lab, 1.0) * sharpness
        trivial += float(loss_fn(prior_logits, lab)) * lab.shape[0]
        perfect += float(loss_fn(one_hot, lab)) * lab.shape[0]
        n += lab.shape[0]
    return PretextBaseline(term, trivial / n, perfect / n, "the class prior at every voxel", n)


def final_loss(csv_path: str | Path, term: str, window: float = 0.1, min_rows: int = 5) -> float | None:
    """Mean of the last ``window`` share (at least ``min_rows`` rows) of the logged ``train/<term>`` values in a
    run's CSV log (NaN rows, e.g. ASA's inactive phase, skipped); None when the term was never logged."""
    path = Path(csv_path)
    if not path.is_file():
        return None
    values = []
    with open(path, encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            v = row.get(f"train/{term}", "")
            if v not in ("", None):
                x = float(v)
                if math.isfinite(x):
                    values.append(x)
    if not values:
        return None
    k = max(min_rows, int(round(window * len(values))))
    tail = values[-k:]
    return sum(tail) / len(tail)


def fraction_learnt(trivial: float, perfect: float, final: float | None) -> float | None:
    """``(trivial - final) / (trivial - perfect)``: 0 = no better than the trivial prediction, 1 = perfect
    (negative: worse than trivial). None without a final loss or an empty range."""
    if final is None or not math.isfinite(trivial - perfect) or abs(trivial - perfect) < 1e-12:
        return None
    return (trivial - final) / (trivial - perfect)


def pretext_report(baselines: list[PretextBaseline], csv_path: str | Path) -> dict:
    """Per term: trivial, perfect, final (last 10% of the logged values) and fraction learnt."""
    out = {}
    for b in baselines:
        final = final_loss(csv_path, b.term)
        out[b.term] = {**asdict(b), "final": final, "fraction_learnt": fraction_learnt(b.trivial, b.perfect, final)}
    return out
