"""Suite-wide settings.

The suite runs on two processes (``pytest -n auto``, pytest-xdist; README's test command): each worker then trains
with one thread, so two workers share a 2-core machine instead of each asking for every core. Commands a test
starts as child processes choose their own threads, as they do for a user.
"""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(workers, 1)))
