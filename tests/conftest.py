"""Suite-wide settings.

The suite runs on one process per core (``pytest -n auto``, pytest-xdist; README's test command). Each worker then
trains with its share of the cores instead of every worker asking for all of them, and so do the commands a test
starts as child processes (``OMP_NUM_THREADS``): a test that compares a run resumed in a child with one made in
the test's own process, bit for bit, needs both to use the same number of threads.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = threads
    torch.set_num_threads(int(threads))


@pytest.fixture(autouse=True)
def _medpretrain_logger_restored(monkeypatch):
    """A test that runs the CLI in its own process gets the medpretrain logger set up (INFO, a handler on that
    test's captured stderr, no propagation): the next test in the worker must find it as it was, or it logs into
    a closed stream and captures what it should not (a non-UTF-8 case name that xdist cannot send)."""
    logger = logging.getLogger("medpretrain")
    monkeypatch.setattr(logger, "handlers", logger.handlers[:])
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(logger, "propagate", logger.propagate)
