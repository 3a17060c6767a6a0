"""The live simulated instrument: frames written one by one, at a cadence, each announced.

A detector system writes a frame under its final name a piece at a time as the readout goes
(a reader looking at the wrong moment sees a partial file), and only when the file is
complete does it announce it; at Keck, by setting a keyword such as ``LASTFILE``.
:func:`run_live` does the same with :mod:`obsflow.sim.simulate`'s frames (the same bytes
:func:`~obsflow.simulate.simulate_night` writes): for each frame, wait for its turn, write it in
``chunks`` pieces over ``write_seconds``, fsync it, then publish its absolute path
``duplicates`` times through a :class:`Publisher` (:class:`obsflow.ioc.InstrumentIoc` or
:class:`obsflow.ioc.IocClient`), or not at all (``publisher=None``: the files are left for
the watch trigger or the reconcile scan to find).
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from obsflow.sim.ioc import PublishError
from obsflow.sim.simulate import SimulatedFrame, night_frames, write_injected_stars

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """Announces a new file's name (e.g. by writing an EPICS PV)."""

    def publish(self, name: str) -> None:
        """Announce ``name``; raise :class:`obsflow.ioc.PublishError` if that is impossible."""


def frame_bytes(data: npt.NDArray[np.uint16], header: fits.Header) -> bytes:
    """The FITS file :func:`obsflow.simulate.write_frame` would write, as bytes."""
    buffer = io.BytesIO()
    fits.PrimaryHDU(data=data, header=header).writeto(buffer)
    return buffer.getvalue()


def write_in_chunks(
    path: Path,
    payload: bytes,
    *,
    chunks: int = 8,
    seconds: float = 0.04,
    fsync: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Write ``payload`` to ``path`` under its final name, NOT atomically: in ``chunks``
    pieces, each flushed (visible to readers) and followed by a pause, ``seconds`` in all;
    then fsync, as a detector system does (``fsync=False`` leaves the bytes to the page
    cache: a replay faster than the disk, as the latency benchmark's search needs). Until
    this returns, a reader may find the file shorter than it will be."""
    if chunks < 1 or seconds < 0:
        raise ValueError(f"write_in_chunks: bad arguments {chunks=} {seconds=}")
    step = -(-len(payload) // chunks)  # ceiling division: at most `chunks` pieces
    with open(path, "wb") as fh:
        for start in range(0, len(payload), max(step, 1)):
            fh.write(payload[start : start + step])
            fh.flush()
            sleep(seconds / chunks)
        if fsync:
            os.fsync(fh.fileno())


def run_live(
    out: Path,
    frames: int,
    *,
    cadence: float = 1.0,
    publisher: Publisher | None = None,
    duplicates: int = 1,
    seed: int = 0,
    night: date = date(2026, 11, 21),
    shape: tuple[int, int] = (512, 512),
    start_number: int = 1,
    chunks: int = 8,
    write_seconds: float = 0.04,
    on_frame: Callable[[SimulatedFrame], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[SimulatedFrame]:
    """Write ``frames`` frames into ``out`` (created if missing), one every ``cadence``
    seconds (measured from the start of one frame to the start of the next; a frame that
    takes longer delays the next), and publish each one's absolute path ``duplicates`` times
    once it is complete. The other arguments are :func:`~obsflow.simulate.simulate_night`'s;
    ``out/injected_stars.ecsv`` is written first. A name that cannot be published is logged
    and the night goes on, as an instrument's would. Returns the frames in the order written.
    """
    if cadence < 0 or duplicates < 1:
        raise ValueError(f"run_live: bad arguments {cadence=} {duplicates=}")
    stream = night_frames(
        out.absolute(), frames, seed=seed, night=night, shape=shape, start_number=start_number
    )
    out.mkdir(parents=True, exist_ok=True)
    write_injected_stars(out, seed=seed, shape=shape)
    written: list[SimulatedFrame] = []
    began = clock()
    for index, (frame, data, header) in enumerate(stream):
        wait = began + index * cadence - clock()
        if wait > 0:
            sleep(wait)
        write_in_chunks(
            frame.path, frame_bytes(data, header), chunks=chunks, seconds=write_seconds, sleep=sleep
        )
        written.append(frame)
        if publisher is not None:
            for _ in range(duplicates):
                try:
                    publisher.publish(str(frame.path))
                except PublishError as exc:
                    log.warning("%s (the file is written; the reconcile scan will find it)", exc)
                    break
        if on_frame is not None:
            on_frame(frame)
    return written
