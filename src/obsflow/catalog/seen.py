"""The reconcile scan's memory: which paths receipt has dealt with, at what size and mtime."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select
from sqlalchemy.dialects import postgresql, sqlite

from obsflow.catalog import Catalog, schema

seen = schema.seen
_LOOKUP = select(seen.c.path, seen.c.size, seen.c.mtime_ns).where(
    seen.c.path.in_(bindparam("paths", expanding=True))
)


@dataclass(frozen=True)
class Stat:
    path: str
    size: int
    mtime_ns: int


class SeenLedger:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def unchanged(self, stats: Sequence[Stat]) -> set[str]:
        """The paths among ``stats`` recorded with this very size and mtime."""
        out: set[str] = set()
        with self.catalog.read() as conn:
            for start in range(0, len(stats), 500):
                chunk = stats[start : start + 500]
                wanted = {s.path: (s.size, s.mtime_ns) for s in chunk}
                for row in conn.execute(_LOOKUP, {"paths": list(wanted)}):
                    if wanted[row.path] == (row.size, row.mtime_ns):
                        out.add(row.path)
        return out

    def mark(self, stats: Iterable[Stat], now: datetime) -> None:
        """Record (or update) each path's size and mtime as dealt with."""
        rows = [{"path": s.path, "size": s.size, "mtime_ns": s.mtime_ns, "at": now} for s in stats]
        if not rows:
            return
        dialect = postgresql if not self.catalog.is_sqlite else sqlite
        stmt = dialect.insert(seen)
        stmt = stmt.on_conflict_do_update(
            index_elements=[seen.c.path],
            set_={
                "size": stmt.excluded.size,
                "mtime_ns": stmt.excluded.mtime_ns,
                "at": stmt.excluded.at,
            },
        )
        with self.catalog.write() as conn:
            conn.execute(stmt, rows)
