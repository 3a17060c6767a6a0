"""Runs at a lower CPU and I/O priority than the way of a frame.

The processes that execute runs (the local executor's pool, a Celery worker's pool) lower
their own priority once, when they start (:func:`lower_priority`); the steps they start
inherit it (the kernel passes both niceness and I/O priority on to children). The daemon's
triggers, receipt and ingestors keep theirs: a frame arriving while a pipeline crunches
is archived as fast as on an idle machine (``processing.nice``, ``processing.ionice``).
"""

from __future__ import annotations

import logging
import os
import sys

import psutil

from obsflow.settings import Processing

log = logging.getLogger(__name__)

LOWEST_BEST_EFFORT = 7
"""The best-effort I/O class's lowest level (0 is the highest)."""


def lower_priority(processing: Processing) -> None:
    """Lower this process's CPU and I/O priority to ``processing``'s (never raise it: an
    unprivileged process could not, and a lower one set by the operator is kept)."""
    if processing.nice:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if processing.nice > current:
            os.setpriority(os.PRIO_PROCESS, 0, processing.nice)
    if processing.ionice == "normal" or not sys.platform.startswith("linux"):
        return
    try:
        me = psutil.Process()
        if processing.ionice == "idle":
            me.ionice(psutil.IOPRIO_CLASS_IDLE)
        else:
            me.ionice(psutil.IOPRIO_CLASS_BE, LOWEST_BEST_EFFORT)
    except (psutil.Error, OSError) as exc:  # a kernel or container without I/O classes
        log.warning("cannot lower the I/O priority of the run workers: %s", exc)
