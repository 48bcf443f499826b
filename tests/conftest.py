"""Suite-wide settings.

The suite runs on one process per core (``pytest -n auto``, pytest-xdist; README's test command). Each worker then
trains with its share of the cores instead of every worker asking for all of them, and so do the commands a test
starts as child processes (``OMP_NUM_THREADS``): a test that compares a run resumed in a child with one made in
the test's own process, bit for bit, needs both to use the same number of threads.
"""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = threads
    torch.set_num_threads(int(threads))
