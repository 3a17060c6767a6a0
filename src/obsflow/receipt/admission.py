"""Whether receipt may open a path at all: a regular file, reached without leaving the
directories it was given.

Receipt reads what a trigger, a scan or ``obsflow ingest`` offers it. Opening a FIFO
would block a receipt worker for ever, a device or a socket is no frame, and a symbolic
link could make the site copy any file it can read (its catalog, another site's data)
into the cache and serve it. So, before anything is opened (:func:`refusal`):

- anything but a regular file (a FIFO, a character or block device, a socket, a
  directory) is refused at once with a reason saying what it is;
- a symbolic link is refused unless ``receipt.follow_symlinks`` is on, and then only one
  whose target lies inside the directories receipt was given (the site's incoming and
  watched directories; the directories named to ``obsflow ingest``).

A refused path is never opened, copied or recorded: the outcome says why (``refused``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Final

_KINDS: Final = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def kind_of(mode: int) -> str:
    """What a file of ``mode`` is, in words."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return "not a regular file"


def refusal(path: Path, roots: Sequence[Path], *, follow_symlinks: bool) -> str | None:
    """Why receipt must not open ``path`` (None: it may). ``roots``: the directories a
    symbolic link may point into (with ``follow_symlinks``). A path that does not exist
    is not refused here (receipt says it vanished)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = path.resolve()
        except (OSError, RuntimeError) as exc:  # a loop of links
            return f"is a symbolic link that cannot be resolved: {exc}"
        if not follow_symlinks:
            return (
                f"is a symbolic link (to {target}); receipt follows none unless "
                "receipt.follow_symlinks is on"
            )
        inside = [root for root in roots if target.is_relative_to(root.resolve())]
        if not inside:
            places = ", ".join(str(r) for r in roots) or "none"
            return f"is a symbolic link to {target}, outside the directories given ({places})"
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return "is a symbolic link to nothing"
    if not stat.S_ISREG(st.st_mode):
        return f"is {kind_of(st.st_mode)}, not a regular file: never opened"
    return None
