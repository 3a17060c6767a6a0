"""Triggers notice new files and offer their paths to receipt. They decide nothing.

A trigger may offer a path twice, offer a file that is still being written, or
miss one altogether: receipt waits until a file is complete, the catalog refuses
bytes it already holds, and the reconcile scan finds whatever every trigger
missed. So a trigger stays small: notice, offer, survive its source going away.

Implementations: :mod:`~obsflow.trigger.watch` (a directory watch),
:mod:`~obsflow.trigger.scan` (the reconcile scan) and
:mod:`~obsflow.trigger.epics` (an EPICS Channel Access keyword monitor).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

Offer = Callable[[Path], None]
"""Called by a trigger, from any thread, with the path of a file that may be new."""


@dataclass(frozen=True)
class Health:
    """What ``obsflow status`` shows of a trigger: fine, or an alarm with its reason."""

    ok: bool
    detail: str = ""


class Trigger(ABC):
    """Notices new files from one source and offers their paths."""

    name: str
    """Short and unique within the daemon, e.g. ``watch:/data/incoming``."""
    kind: ClassVar[str] = "other"
    """What it listens to, as the status shows it: ``watch``, ``epics``, ``scan``."""

    @abstractmethod
    def start(self, offer: Offer) -> None:
        """Begin noticing; return at once (work happens on the trigger's own threads)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop noticing and release every resource; offer nothing after returning."""

    def health(self) -> Health:
        """Whether the source is reachable and alive (e.g. a heartbeat is fresh)."""
        return Health(ok=True)
