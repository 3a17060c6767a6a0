"""A directory watch (watchdog): files closed after writing, created, or moved in.

Kernel events (inotify) by default; ``polling: true`` for network file systems
where they never fire. A path may be offered several times (created, then closed);
receipt takes a file once it is complete, and the catalog keeps one copy.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from obsflow.trigger import Health, Offer, Trigger

log = logging.getLogger(__name__)


class WatchTrigger(Trigger):
    kind = "watch"

    def __init__(
        self,
        directory: Path,
        *,
        recursive: bool = False,
        polling: bool = False,
        poll_seconds: float = 1.0,
    ) -> None:
        self.directory = directory
        self.recursive = recursive
        self.polling = polling
        self.poll_seconds = poll_seconds
        self.name = f"watch:{directory}"
        self._observer: BaseObserver | None = None

    def start(self, offer: Offer) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        observer: BaseObserver = (
            PollingObserver(timeout=self.poll_seconds) if self.polling else Observer()
        )
        observer.schedule(
            _Handler(offer, self.polling), str(self.directory), recursive=self.recursive
        )
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None

    def health(self) -> Health:
        if self._observer is None or not self._observer.is_alive():
            return Health(ok=False, detail=f"not watching {self.directory}")
        return Health(ok=True)


class _Handler(FileSystemEventHandler):
    def __init__(self, offer: Offer, polling: bool) -> None:
        self.offer = offer
        self.polling = polling
        # a polling observer sees no opens and closes: a change is all it can report
        self.kinds: tuple[type[FileSystemEvent], ...] = (
            (FileCreatedEvent, FileModifiedEvent)
            if polling
            else (FileCreatedEvent, FileClosedEvent)
        )

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            path = Path(str(event.dest_path))
        elif isinstance(event, self.kinds):
            path = Path(str(event.src_path))
            if isinstance(event, FileCreatedEvent) and not self.polling and _empty(path):
                return  # a writer has just created it: its close will be reported
        else:
            return
        if not path.name.startswith("."):  # hidden names are writers' temporary files
            self.offer(path)


def _empty(path: Path) -> bool:
    """An empty regular file (its writer's close will be reported); anything else (a
    FIFO, a link) is offered at once, for receipt to refuse with its reason."""
    try:
        st = path.lstat()
    except OSError:
        return True
    return stat.S_ISREG(st.st_mode) and st.st_size == 0
