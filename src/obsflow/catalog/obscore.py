"""The SQL of the IVOA services: the ObsCore view of the files, small tables of
literals (TAP_SCHEMA), and the one way a translated ADQL query is run.

ObsCore is not a stored table: :func:`obscore_select` is a ``SELECT`` over ``files``
made for each query, with the registry's declarations (field of view, wavelengths
per filter, dataproduct type...) as ``CASE`` expressions over the product, the
instrument and the filter, and the reader's :class:`~obsflow.access.ReadRule`
applied by its SQL form: a file the reader may not read yet keeps its public columns
(its times, its instrument, its release date) and shows NULL for its target, its
position and its region, so no cone search can find where it points. Nothing is
stored twice, so nothing goes stale when the registry changes.

:func:`run_query` runs a query that :mod:`obsflow.ivoa.adql` made from a user's
ADQL (regenerated from the parsed tree, never the user's text) with these selects as
its common table expressions, in a read-only transaction with a time limit. They are
compiled once (:class:`Statement`): compiling the view took longer than running a
cone search, so :meth:`ObsCoreView.statement` keeps one compiled view per engine and
shape of reader, and binds the reader's instant and programs as parameters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    Dialect,
    Float,
    Integer,
    Select,
    String,
    bindparam,
    case,
    cast,
    false,
    func,
    literal,
    null,
    select,
    text,
    union_all,
)
from sqlalchemy.exc import DBAPIError, OperationalError

from obsflow.access import ReadRule
from obsflow.catalog import Catalog
from obsflow.catalog.schema import files, is_live, run_inputs
from obsflow.errors import ObsflowError

__all__ = [
    "URL_PARAMETER",
    "InstrumentFacts",
    "ObsCoreFacts",
    "ObsCoreView",
    "ProductFacts",
    "QueryError",
    "QueryResult",
    "Statement",
    "compiled",
    "derived_from",
    "literal_table",
    "obscore_select",
    "run_query",
]


class QueryError(ObsflowError):
    """A translated query the database refused or that ran out of time (says which)."""


@dataclass(frozen=True)
class ProductFacts:
    """What ObsCore says of every file of one product (from the registry)."""

    dataproduct_type: str
    calib_level: int
    o_ucd: str


@dataclass(frozen=True)
class InstrumentFacts:
    """What ObsCore says of every frame of one instrument (from the registry); None:
    unknown (NULL)."""

    facility: str | None = None
    fov_deg: float | None = None
    resolution_arcsec: float | None = None
    pixels: tuple[int, int] | None = None
    wavelength_m: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """Filter → (em_min, em_max), metres."""


@dataclass(frozen=True)
class ObsCoreFacts:
    """Everything :func:`obscore_select` needs besides the catalog and the reader."""

    products: Mapping[str, ProductFacts]
    instruments: Mapping[str, InstrumentFacts]
    authority: str
    """``ivo://...``: ``obs_publisher_did`` is ``<authority>?<archive ID>``."""
    data_url: str
    """The prefix of ``access_url`` (the archive ID follows), e.g.
    ``http://host/api/v1/files/``."""
    datalink_url: str | None = None
    """The prefix of a dataset's DataLink document (``...?ID=`` + its DID), if served."""


def _typed(value: Any, type_: Any) -> ColumnElement[Any]:
    """``value`` as SQL of ``type_``: a float is cast, so that once written into the SQL
    (:meth:`ObsCoreView.statement`) PostgreSQL reads it as a float, not a numeric."""
    if type_ is Float:
        return cast(literal(value, Float), Float)
    return literal(value, type_)


def _by_product(facts: ObsCoreFacts, value: Any, default: Any, type_: Any) -> ColumnElement[Any]:
    """A ``CASE`` over the product giving ``value(product facts)``."""
    whens = [
        (files.c.product == name, literal(value(p), type_))
        for name, p in sorted(facts.products.items())
    ]
    if not whens:
        return literal(default, type_) if default is not None else null()
    return case(*whens, else_=literal(default, type_) if default is not None else null())


def _by_instrument(facts: ObsCoreFacts, value: Any, type_: Any) -> ColumnElement[Any]:
    whens = [
        (files.c.instrument == name, _typed(value(i), type_))
        for name, i in sorted(facts.instruments.items())
        if value(i) is not None
    ]
    return case(*whens, else_=null()) if whens else cast(null(), type_)


def _by_filter(facts: ObsCoreFacts, index: int) -> ColumnElement[Any]:
    whens = [
        (
            (files.c.instrument == name) & (files.c.filter == band),
            _typed(span[index], Float),
        )
        for name, i in sorted(facts.instruments.items())
        for band, span in sorted(i.wavelength_m.items())
    ]
    return case(*whens, else_=null()) if whens else cast(null(), Float)


def _res_power(facts: ObsCoreFacts) -> ColumnElement[Any]:
    whens = [
        (
            (files.c.instrument == name) & (files.c.filter == band),
            _typed((low + high) / 2 / (high - low), Float),
        )
        for name, i in sorted(facts.instruments.items())
        for band, (low, high) in sorted(i.wavelength_m.items())
    ]
    return case(*whens, else_=null()) if whens else cast(null(), Float)


URL_PARAMETER: Final = "obscore_data_url"
"""The bound parameter that sets ``access_url``'s prefix per query (``run_query``'s
``params``); without it, :attr:`ObsCoreFacts.data_url`."""


class ObsCoreView:
    """:func:`obscore_select` of one registry, its branches built once: a query then
    only adds the reader's rule (building them costs more than running a cone search),
    and :meth:`statement` compiles them once per engine and shape of reader."""

    def __init__(self, facts: ObsCoreFacts) -> None:
        self.facts = facts
        self._mine = _branch(facts, shown=True)
        self._others = _branch(facts, shown=False)
        self._templates: dict[tuple[str, bool, int, bool], _RuleTemplate] = {}
        self._lock = threading.Lock()

    def select(self, readable: ColumnElement[bool], *, hidden: bool = True) -> Select[Any]:
        """ObsCore for the reader whose rule is ``readable``; ``hidden`` False: without
        the files it may not read, for a query that cannot find them anyway (one that
        asks for a position in a region: theirs are NULL), so that no plan reads them."""
        mine = self._mine.where(readable)
        if not hidden:
            return mine
        others = self._others.where(~func.coalesce(readable, false()))
        everything: Select[Any] = select(union_all(mine, others).subquery())
        return everything

    def statement(self, rule: ReadRule, dialect: Dialect, *, hidden: bool = True) -> Statement:
        """This view for ``rule``'s reader (``hidden``: see :meth:`select`; a reader who
        reads everything has no hidden files), compiled once per engine and shape of
        rule (reads everything, or how many programs), its instant and programs bound
        as parameters (the rule itself is :meth:`ReadRule.sql`, as everywhere)."""
        hidden = hidden and not rule.everything
        key = (dialect.name, rule.everything, len(rule.programs), hidden)
        with self._lock:
            template = self._templates.get(key)
        if template is None:
            template = _RuleTemplate.of(self, dialect, rule, hidden)
            with self._lock:
                self._templates[key] = template
        return template.bind(rule)


_NOW: Final = datetime(1, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
_URL: Final = "obsflow placeholder of access_url"


def _program(index: int) -> str:
    return f"obsflow placeholder of program {index:04d}"  # sorts as its index


@dataclass(frozen=True)
class _RuleTemplate:
    """The view compiled with its values written in, for a rule made of placeholders
    (:data:`_NOW`, :func:`_program`) and a placeholder URL, each then turned into a
    parameter: a query's SQL has three parameters, not the view's hundred values."""

    statement: Statement
    programs: tuple[str, ...]
    """The parameters of the programs, in order."""
    process_now: Any

    @classmethod
    def of(
        cls, view: ObsCoreView, dialect: Dialect, shape: ReadRule, hidden: bool
    ) -> _RuleTemplate:
        """The template of rules shaped like ``shape`` (whose values it does not keep)."""
        programs, everything = len(shape.programs), shape.everything
        rule = ReadRule(frozenset(_program(i) for i in range(programs)), everything, _NOW)
        readable = rule.sql(files.c.proprietary_until, files.c.program)
        query = view.select(readable, hidden=hidden)
        sql = _literal_sql(query.params({URL_PARAMETER: _URL}), dialect)
        names = tuple(f"obscore_program_{i}" for i in range(programs))
        holes: list[tuple[Any, Any, str]] = [(_URL, String(), URL_PARAMETER)] + [
            (_program(i), files.c.program.type, names[i]) for i in range(programs)
        ]
        if not everything:
            holes.append((_NOW, files.c.proprietary_until.type, "obscore_now"))
        for value, type_, name in holes:
            made = literal(value, type_).compile(
                dialect=dialect, compile_kwargs={"literal_binds": True}
            )
            written = made.string.replace(":", "\\:")
            if written not in sql:  # ReadRule.sql or the view changed shape
                raise AssertionError(f"ObsCoreView: {value!r} is not in the compiled view")
            sql = sql.replace(written, f":{name}")
        statement = Statement(sql, {URL_PARAMETER: view.facts.data_url})
        process = files.c.proprietary_until.type.dialect_impl(dialect).bind_processor(dialect)
        return cls(statement, names, process)

    def bind(self, rule: ReadRule) -> Statement:
        params = dict(self.statement.params)
        if not rule.everything:
            now = rule.now
            params["obscore_now"] = self.process_now(now) if self.process_now else now
        for name, program in zip(self.programs, sorted(rule.programs), strict=True):
            params[name] = program
        return Statement(self.statement.sql, params)


def obscore_select(facts: ObsCoreFacts, readable: ColumnElement[bool]) -> Select[Any]:
    """ObsCore 1.1's columns, one row per live, current file. ``readable`` is the
    reader's :meth:`~obsflow.access.ReadRule.sql` over ``files``: where it is false,
    the target, position and region are NULL (the rest is public).

    Two branches, ``UNION ALL``: the files the reader may read, with their columns as
    they are, and the others, with NULLs. Both engines push a query's conditions into
    each branch, so a cone search's declination band and a time range reach the
    indexes on ``files.dec`` and ``files.start_mjd`` (a ``CASE`` would hide them)."""
    return ObsCoreView(facts).select(readable)


def _branch(facts: ObsCoreFacts, *, shown: bool) -> Select[Any]:
    f = files.c

    def hidden(column: ColumnElement[Any]) -> ColumnElement[Any]:
        return column if shown else cast(null(), column.type)

    fov = _by_instrument(facts, lambda i: i.fov_deg, Float)
    region = (
        literal("CIRCLE ICRS ", String)
        + cast(f.ra, String)
        + literal(" ", String)
        + cast(f.dec, String)
        + literal(" ", String)
        + cast(fov / 2, String)
    )
    has_region = f.ra.is_not(None) & f.dec.is_not(None) & fov.is_not(None)
    did = literal(facts.authority + "?", String) + f.archive_id
    access = (
        literal(facts.datalink_url, String) + did
        if facts.datalink_url
        else bindparam(URL_PARAMETER, facts.data_url, type_=String)
        + f.archive_id
        + literal("/data", String)
    )
    access_format = (
        "application/x-votable+xml;content=datalink" if facts.datalink_url else "application/fits"
    )
    columns: list[ColumnElement[Any]] = [
        _by_product(facts, lambda p: p.dataproduct_type, "image", String).label("dataproduct_type"),
        _by_product(facts, lambda p: p.calib_level, None, Integer).label("calib_level"),
        f.instrument.label("obs_collection"),
        f.archive_id.label("obs_id"),
        did.label("obs_publisher_did"),
        access.label("access_url"),
        literal(access_format, String).label("access_format"),
        ((f.size + 1023) // 1024).label("access_estsize"),
        hidden(f.object).label("target_name"),
        hidden(f.ra).label("s_ra"),
        hidden(f.dec).label("s_dec"),
        fov.label("s_fov"),
        (case((has_region, region), else_=null()) if shown else cast(null(), String)).label(
            "s_region"
        ),
        _by_instrument(facts, lambda i: i.resolution_arcsec, Float).label("s_resolution"),
        _by_instrument(facts, lambda i: i.pixels[0] if i.pixels else None, Integer).label("s_xel1"),
        _by_instrument(facts, lambda i: i.pixels[1] if i.pixels else None, Integer).label("s_xel2"),
        f.start_mjd.label("t_min"),
        f.stop_mjd.label("t_max"),
        f.exptime.label("t_exptime"),
        f.exptime.label("t_resolution"),
        literal(1, Integer).label("t_xel"),
        _by_filter(facts, 0).label("em_min"),
        _by_filter(facts, 1).label("em_max"),
        _res_power(facts).label("em_res_power"),
        literal(1, Integer).label("em_xel"),
        _by_product(facts, lambda p: p.o_ucd, None, String).label("o_ucd"),
        cast(null(), String).label("pol_states"),
        cast(null(), Integer).label("pol_xel"),
        case(
            (
                _by_instrument(facts, lambda i: i.facility, String).is_not(None),
                _by_instrument(facts, lambda i: i.facility, String),
            ),
            else_=f.telescope,
        ).label("facility_name"),
        f.instrument.label("instrument_name"),
        # optional ObsCore columns obsflow knows
        f.program.label("proposal_id"),
        f.proprietary_until.label("obs_release_date"),
        f.filter.label("em_filter"),
        f.frame_type.label("obs_type"),
    ]
    found: Select[Any] = select(*columns).where(is_live(), f.superseded_by.is_(None))
    return found


def literal_table(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> Select[Any]:
    """A table of literal rows (TAP_SCHEMA's), as a ``SELECT ... UNION ALL ...``; with
    no rows, one ``SELECT`` that yields none."""
    if not rows:
        nulls: list[Any] = [cast(null(), String).label(n) for n in names]
        empty: Select[Any] = select(*nulls).where(literal(False))
        return empty
    parts: list[Select[Any]] = [
        select(
            *(
                literal(v).label(n) if v is not None else null().label(n)
                for n, v in zip(names, r, strict=True)
            )
        )
        for r in rows
    ]
    if len(parts) == 1:
        return parts[0]
    everything: Select[Any] = select(union_all(*parts).subquery())
    return everything


@dataclass(frozen=True)
class Statement:
    """A ``SELECT`` compiled once for one engine: its SQL, with ``:name`` parameters,
    and their values as the driver takes them."""

    sql: str
    params: Mapping[str, Any] = field(default_factory=dict)


def _literal_sql(query: Select[Any], dialect: Dialect) -> str:
    """``query``'s SQL for ``dialect`` with its values written in, its colons escaped
    for :func:`~sqlalchemy.text` (which reads ``:name`` as a parameter)."""
    made = query.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    return made.string.replace(":", "\\:")


def compiled(query: Select[Any], dialect: Dialect) -> Statement:
    """``query`` compiled for ``dialect``, its values written in (a constant table,
    such as TAP_SCHEMA's)."""
    return Statement(_literal_sql(query, dialect))


@dataclass(frozen=True)
class QueryResult:
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    seconds: float


def run_query(
    catalog: Catalog,
    sql: str,
    tables: Mapping[str, Statement],
    *,
    seconds: float,
    params: Mapping[str, Any] | None = None,
    explain: bool = False,
) -> QueryResult:
    """Run ``sql`` (made by :func:`obsflow.ivoa.adql.translate`, which names its
    tables as the keys of ``tables``) with ``tables`` as its common table expressions,
    read-only, stopped after ``seconds``; ``explain``: the engine's plan of it instead
    (``EXPLAIN QUERY PLAN`` on SQLite, ``EXPLAIN`` on PostgreSQL). Raises
    :class:`QueryError` with the database's own words when it refuses it."""
    whole = _with(sql.replace(":", "\\:"), tables)
    if explain:
        whole = ("EXPLAIN QUERY PLAN " if catalog.is_sqlite else "EXPLAIN ") + whole
    query = text(whole)
    values: dict[str, Any] = {}
    for table in tables.values():
        values.update(table.params)
    values.update(params or {})
    started = time.monotonic()
    try:
        with catalog.engine.connect() as conn:
            if catalog.is_sqlite:
                deadline = started + seconds
                raw = conn.connection.driver_connection
                raw.set_progress_handler(  # type: ignore[union-attr]
                    lambda: 1 if time.monotonic() > deadline else 0, 10_000
                )
                try:
                    with conn.begin():
                        result = conn.execute(query, values)
                        rows = [tuple(r) for r in result]
                        names = tuple(result.keys())
                finally:
                    raw.set_progress_handler(None, 0)  # type: ignore[union-attr]
            else:
                with conn.begin():
                    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(seconds * 1000)}")
                    result = conn.execute(query, values)
                    rows = [tuple(r) for r in result]
                    names = tuple(result.keys())
    except (OperationalError, DBAPIError) as exc:
        elapsed = time.monotonic() - started
        message = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        if elapsed >= seconds or "interrupted" in message or "statement timeout" in message:
            raise QueryError(f"the query ran longer than {seconds:g} s and was stopped") from None
        raise QueryError(f"the database refused the query: {message}") from None
    return QueryResult(names, rows, time.monotonic() - started)


def _with(sql: str, tables: Mapping[str, Statement]) -> str:
    """``sql`` with ``tables`` as common table expressions before its own (if any)."""
    if not tables:
        return sql
    ours = ", ".join(f'"{name}" AS ({table.sql})' for name, table in tables.items())
    for head in ("WITH RECURSIVE ", "WITH "):
        if sql.startswith(head):
            return f"{head}{ours}, {sql[len(head) :]}"
    return f"WITH {ours} {sql}"


def derived_from(catalog: Catalog, file_id: int) -> list[int]:
    """The live files that runs made from ``file_id`` (DataLink's ``#derivation``)."""
    with catalog.read() as conn:
        used = select(run_inputs.c.run_id).where(run_inputs.c.file_id == file_id)
        query = (
            select(files.c.id).where(files.c.made_by_run.in_(used), is_live()).order_by(files.c.id)
        )
        return list(conn.execute(query).scalars())
