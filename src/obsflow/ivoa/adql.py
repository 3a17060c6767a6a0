"""ADQL 2.1 → the catalog's SQL (SQLite or PostgreSQL), through a real parser.

We use `sqlglot <https://sqlglot.com>`_ rather than ``queryparser-python3``: sqlglot
parses ``SELECT TOP n`` (its T-SQL grammar is ADQL's ancestor), joins, subqueries,
``ORDER BY``, set operations and every function we allow into a syntax tree, and
*generates* SQL for both our engines from it, while queryparser only parses (into
ANTLR trees) and would leave the SQL generation, per engine, to us; it is also
kept up to date far more often. The user's text never reaches the database: the
tree is checked (one ``SELECT``; only the published tables; only the functions
below) and the SQL is generated from the checked tree.

Geometry is rewritten into plain arithmetic on the sphere, the same on both engines
(no extension needed): ``DISTANCE`` by the haversine formula; ``CONTAINS`` and
``INTERSECTS`` of a point and a ``CIRCLE`` by that distance, with a declination
range first (a cheap, exact prefilter); of a point and a convex ``POLYGON`` or a
``BOX`` by the side of each edge's great circle the point lies on (exact).

Where the catalog has a sky index (:mod:`obsflow.catalog.sky`), a ``1 = CONTAINS(...)``
of ObsCore's ``s_ra``/``s_dec`` and a circle or polygon of numbers gets a prefilter
that reads it (the files in the bounding boxes of the region's circle: SQLite's R*Tree;
q3c on PostgreSQL) before the exact test, but only where it is one of the ANDed
conditions of a ``WHERE``: there it can only drop rows the exact test drops too
(under ``NOT`` or ``OR`` it could not, and it would answer for a proprietary row's
hidden position).
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

from obsflow.catalog.sky import MARGIN_DEG, SkyIndex, boxes
from obsflow.catalog.sky import TABLE as SKY_TABLE
from obsflow.errors import ObsflowError

__all__ = ["AdqlError", "Translated", "translate"]


class AdqlError(ObsflowError):
    """An ADQL query obsflow cannot run: bad syntax, an unknown table or function,
    or a statement that is not a query (the message names it)."""


# sqlglot's classes for the ADQL functions (and a few common ones) we pass on
_ALLOWED: Final[tuple[type[exp.Expr], ...]] = (
    exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max,
    exp.Abs, exp.Ceil, exp.Floor, exp.Round, exp.Sqrt, exp.Pow, exp.Exp, exp.Ln, exp.Log,
    exp.Mod, exp.Pi, exp.Sin, exp.Cos, exp.Tan, exp.Asin, exp.Acos, exp.Atan, exp.Atan2,
    exp.Degrees, exp.Radians, exp.Trunc, exp.Sign,
    exp.Lower, exp.Upper, exp.Trim, exp.Substring, exp.Length, exp.Coalesce, exp.Cast,
    exp.Case, exp.If, exp.Nullif,
)  # fmt: skip

# operators sqlglot also counts as functions (AND, OR, XOR...)
_OPERATORS: Final[tuple[type[exp.Expr], ...]] = (
    exp.Binary, exp.Unary, exp.Connector, exp.Predicate,
)  # fmt: skip

MAX_QUERY: Final = 100_000
"""The longest ADQL text accepted, in characters."""

_GEOMETRY: Final = frozenset({"POINT", "CIRCLE", "POLYGON", "BOX"})
_PREDICATES: Final = frozenset({"CONTAINS", "INTERSECTS"})
_FRAMES: Final = frozenset({"", "ICRS", "J2000", "FK5", "ICRS GEOCENTER", "UNKNOWNFRAME"})


@dataclass(frozen=True)
class Translated:
    """A query ready for :func:`obsflow.catalog.obscore.run_query`."""

    sql: str
    top: int | None
    """The query's own ``TOP`` (None: none)."""
    hidden: bool = True
    """Whether the query may find ObsCore rows whose position the reader may not see;
    False when it reads ObsCore once and asks for a position in a region (ANDed in its
    ``WHERE``), which such rows (their positions NULL) never are."""


def translate(
    adql: str,
    tables: Mapping[str, str],
    dialect: str,
    *,
    limit: int | None,
    columns: Mapping[str, frozenset[str]] | None = None,
    sky: SkyIndex = SkyIndex.NONE,
) -> Translated:
    """``adql`` in ``dialect`` (``sqlite`` or ``postgresql``), reading the published
    ``tables`` (ADQL name, e.g. ``ivoa.obscore`` → the name it is run under), at most
    ``limit`` rows (besides its own ``TOP``). ``columns`` (ADQL table name → its
    column names), when given, lets a query name only those and its own aliases
    (SQLite would read an unknown ``"name"`` as a string). ``sky``: the catalog's sky
    index, which cone searches of ``ivoa.obscore`` read. Raises :class:`AdqlError`."""
    if not adql.strip():
        raise AdqlError("the query is empty")
    if len(adql) > MAX_QUERY:
        raise AdqlError(f"the query is {len(adql)} characters long: at most {MAX_QUERY}")
    try:
        return _translate(adql, tables, dialect, limit, columns, sky)
    except RecursionError:
        raise AdqlError("the query is nested too deeply") from None
    except SqlglotError as exc:  # the tokenizer's and the generator's own complaints
        raise AdqlError(f"ADQL syntax error: {str(exc).splitlines()[0]}") from None


def _translate(
    adql: str,
    tables: Mapping[str, str],
    dialect: str,
    limit: int | None,
    columns: Mapping[str, frozenset[str]] | None,
    sky: SkyIndex,
) -> Translated:
    try:
        parsed = sqlglot.parse(adql, read="tsql")
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        where = f" at line {first.get('line')}, column {first.get('col')}" if first else ""
        raise AdqlError(f"ADQL syntax error{where}: {first.get('description', str(exc))}") from None
    statements = [s for s in parsed if s is not None]
    if len(statements) != 1:
        raise AdqlError(f"expected one SELECT statement, found {len(statements)} statements")
    tree = statements[0]
    if not isinstance(tree, exp.Query):
        word = adql.split(maxsplit=1)[0]
        raise AdqlError(f"only SELECT queries are allowed, not {word!r}")
    tree = normalize_identifiers(tree, dialect="postgres")
    top = _top(tree)
    if columns is not None:
        _check_columns(tree, tables, columns)
    _check(tree, {k.lower(): v for k, v in tables.items()})
    obscore = tables.get("ivoa.obscore")
    if obscore is not None and any(c.alias_or_name == obscore for c in tree.find_all(exp.CTE)):
        obscore = None  # a table of the query's own under that name: no prefilter
    cones: list[str] = []  # the aliases of ObsCore that a WHERE asks for a region
    tree = tree.transform(_geometry, obscore, sky, cones, copy=False)
    reads = [t for t in tree.find_all(exp.Table) if t.name == obscore and not t.db]
    assert isinstance(tree, exp.Query)
    wanted = [n for n in (top, limit) if n is not None]
    if wanted:
        tree = tree.limit(min(wanted), copy=False)
    target = "postgres" if dialect.startswith("postgres") else "sqlite"
    hidden = not (cones and len(reads) == 1)
    return Translated(tree.sql(dialect=target, identify=True), top, hidden)


def _top(tree: exp.Query) -> int | None:
    found = tree.args.get("limit")
    if found is None:
        return None
    value = found.expression if isinstance(found, exp.Limit) else None
    if not isinstance(value, exp.Literal) or value.is_string or not value.this.isdigit():
        raise AdqlError("TOP must be followed by a whole number")
    return int(value.this)


def _check(tree: exp.Expr, tables: Mapping[str, str]) -> None:
    """Refuse what is not a query over the published tables with allowed functions;
    rename the tables to the names they run under (in place)."""
    local = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    for node in tree.walk():
        if isinstance(node, exp.Table):
            if isinstance(node.this, exp.Func):
                raise AdqlError(f"table functions are not allowed: {node.this.sql()}")
            name = ".".join(p for p in (node.catalog, node.db, node.name) if p).lower()
            if name in local and not node.db:
                continue
            if name not in tables:
                known = ", ".join(sorted(tables))
                raise AdqlError(f"unknown table {name!r}: expected one of {known}")
            alias = node.alias or node.name
            node.set("this", exp.to_identifier(tables[name]))
            node.set("db", None)
            node.set("catalog", None)
            node.set("alias", exp.TableAlias(this=exp.to_identifier(alias)))
        elif isinstance(node, exp.Column) and node.args.get("db") is not None:
            node.set("db", None)  # ivoa.obscore.s_ra → obscore.s_ra
            node.set("catalog", None)
        elif isinstance(node, exp.Anonymous):
            name = str(node.this).upper()
            if name not in _GEOMETRY | _PREDICATES | {"DISTANCE"}:
                raise AdqlError(f"unknown or unsupported function {name}()")
        elif isinstance(node, exp.Contains):
            pass
        elif isinstance(node, exp.Func) and not isinstance(node, _ALLOWED + _OPERATORS):
            raise AdqlError(f"unsupported function {node.sql(dialect='tsql').split('(')[0]}()")
        elif isinstance(node, (exp.Command, exp.Into, exp.Lock)):
            raise AdqlError("only SELECT queries are allowed")


def _check_columns(
    tree: exp.Expr, tables: Mapping[str, str], columns: Mapping[str, frozenset[str]]
) -> None:
    """Every column named is one of the tables read or an alias the query makes."""
    known: set[str] = set()
    for node in tree.find_all(exp.Table):
        name = ".".join(p for p in (node.catalog, node.db, node.name) if p).lower()
        known |= columns.get(name, frozenset())
    for alias in tree.find_all(exp.Alias):
        known.add(alias.alias.lower())
    for table_alias in tree.find_all(exp.TableAlias):
        known |= {c.name.lower() for c in table_alias.columns}
    for column in tree.find_all(exp.Column):
        if isinstance(column.this, exp.Star):
            continue
        if column.name.lower() not in known:
            raise AdqlError(f"unknown column {column.name!r}")


# ------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class _Point:
    ra: exp.Expr
    dec: exp.Expr


@dataclass(frozen=True)
class _Circle:
    center: _Point
    radius: exp.Expr


@dataclass(frozen=True)
class _Polygon:
    vertices: tuple[tuple[float, float], ...]


def _name(node: exp.Expr) -> str:
    if isinstance(node, exp.Contains):
        return "CONTAINS"
    if isinstance(node, exp.Anonymous):
        return str(node.this).upper()
    return ""


def _args(node: exp.Expr) -> list[exp.Expr]:
    if isinstance(node, exp.Contains):
        return [node.this, node.expression]
    return list(node.expressions)


def _frame(
    args: list[exp.Expr], counts: tuple[int, ...], what: str, how_many: str = ""
) -> list[exp.Expr]:
    """The arguments without the optional coordinate system (ADQL 2.0's first one)."""
    if args and isinstance(args[0], exp.Literal) and args[0].is_string:
        system = args[0].this.strip().upper()
        if system not in _FRAMES:
            raise AdqlError(f"{what}: unsupported coordinate system {args[0].this!r}: use 'ICRS'")
        args = args[1:]
    if len(args) not in counts:
        wanted = how_many or " or ".join(map(str, counts))
        raise AdqlError(f"{what}: expected {wanted} coordinates, not {len(args)}")
    return args


def _number(node: exp.Expr, what: str) -> float:
    value = node
    sign = 1.0
    if isinstance(value, exp.Neg):
        sign, value = -1.0, value.this
    if isinstance(value, exp.Paren):
        value = value.this
    if isinstance(value, exp.Literal) and not value.is_string:
        return sign * float(value.this)
    raise AdqlError(f"{what}: its coordinates must be numbers, not {node.sql()}")


def _shape(node: exp.Expr) -> _Point | _Circle | _Polygon:
    name = _name(node)
    args = _args(node)
    if name == "POINT":
        ra, dec = _frame(args, (2,), "POINT")
        return _Point(ra, dec)
    if name == "CIRCLE":
        args = _frame(args, (2, 3), "CIRCLE")
        if len(args) == 2:
            if _name(args[0]) != "POINT":
                raise AdqlError("CIRCLE: expected (ra, dec, radius) or (POINT, radius)")
            center = _shape(args[0])
            assert isinstance(center, _Point)
            return _Circle(center, args[1])
        return _Circle(_Point(args[0], args[1]), args[2])
    if name == "POLYGON":
        args = _frame(args, tuple(range(6, 200, 2)), "POLYGON", "an even number, 6 to 198, of")
        values = [_number(a, "POLYGON") for a in args]
        return _polygon(tuple(zip(values[0::2], values[1::2], strict=True)))
    if name == "BOX":
        x, y, width, height = (_number(a, "BOX") for a in _frame(args, (4,), "BOX"))
        w, h = width / 2, height / 2
        return _polygon(((x - w, y - h), (x + w, y - h), (x + w, y + h), (x - w, y + h)))
    raise AdqlError(f"expected a POINT, CIRCLE, POLYGON or BOX, not {node.sql()}")


def _vector(ra: float, dec: float) -> tuple[float, float, float]:
    a, d = math.radians(ra), math.radians(dec)
    return (math.cos(d) * math.cos(a), math.cos(d) * math.sin(a), math.sin(d))


def _cross(
    u: tuple[float, float, float], v: tuple[float, float, float]
) -> tuple[float, float, float]:
    return (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])


def _dot(u: tuple[float, float, float], v: tuple[float, float, float]) -> float:
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def _normals(vertices: tuple[tuple[float, float], ...]) -> list[tuple[float, float, float]]:
    points = [_vector(*v) for v in vertices]
    return [_cross(p, points[(i + 1) % len(points)]) for i, p in enumerate(points)]


def _polygon(vertices: tuple[tuple[float, float], ...]) -> _Polygon:
    """A convex polygon, its vertices turned counter-clockwise (seen from inside)."""
    normals = _normals(vertices)
    points = [_vector(*v) for v in vertices]
    signs = {
        _dot(n, points[(i + 2) % len(points)]) > 0 for i, n in enumerate(normals)
    }  # each edge must see the next-but-one vertex on the same side
    if len(signs) != 1:
        raise AdqlError("POLYGON: only convex polygons (vertices in order) are supported")
    return _Polygon(vertices if signs == {True} else tuple(reversed(vertices)))


@functools.lru_cache(maxsize=256)
def _template(template: str) -> exp.Expr:
    """``template`` parsed once, its ``{name}`` placeholders as columns ``__name``."""
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    return sqlglot.parse_one(template.format(**{n: f"__{n}" for n in names}), read="tsql")


def _sql(template: str, **parts: exp.Expr) -> exp.Expr:
    """``template`` with each ``{name}`` replaced by (a copy of) ``parts[name]``, in
    parentheses: a tree made from trees, never from text."""

    def put(node: exp.Expr) -> exp.Expr:
        if isinstance(node, exp.Column) and not node.table and node.name.startswith("__"):
            part = parts[node.name[2:]]  # copied only once it stands somewhere already
            return exp.Paren(this=part.copy() if part.parent is not None else part)
        return node

    return _template(template).copy().transform(put, copy=False)


def _distance(a: _Point, b: _Point) -> exp.Expr:
    """The angle between two points, degrees (haversine; clamped against rounding)."""
    hav = _sql(
        "SIN(RADIANS({d2} - {d1}) / 2) * SIN(RADIANS({d2} - {d1}) / 2)"
        " + COS(RADIANS({d1})) * COS(RADIANS({d2}))"
        " * SIN(RADIANS({a2} - {a1}) / 2) * SIN(RADIANS({a2} - {a1}) / 2)",
        a1=a.ra,
        d1=a.dec,
        a2=b.ra,
        d2=b.dec,
    )
    return _sql("DEGREES(2 * ASIN(SQRT(CASE WHEN {h} > 1 THEN 1 ELSE {h} END)))", h=hav)


def _numbers(circle: _Circle) -> tuple[float, float, float] | None:
    """The circle's centre and radius, when they are numbers (finite)."""
    try:
        values = tuple(
            _number(v, "CIRCLE") for v in (circle.center.ra, circle.center.dec, circle.radius)
        )
    except AdqlError:
        return None
    return (values[0], values[1], values[2]) if all(map(math.isfinite, values)) else None


def _inside(point: _Point, region: _Circle | _Polygon) -> exp.Expr:
    if isinstance(region, _Circle) and (known := _numbers(region)) is not None:
        # the haversine of the distance against the haversine of the radius (the same
        # test as DISTANCE <= r, the constants worked out here: a third of the SQL)
        ra0, dec0, radius = known
        limit = math.sin(math.radians(min(max(radius, 0.0), 180.0)) / 2) ** 2
        limit = 2.0 if radius >= 180.0 else limit if radius >= 0.0 else -1.0
        exact = _sql(
            "SIN(RADIANS({d} - {d0}) / 2) * SIN(RADIANS({d} - {d0}) / 2) + {c0} * COS("
            "RADIANS({d})) * SIN(RADIANS({a} - {a0}) / 2) * SIN(RADIANS({a} - {a0}) / 2)"
            " <= {h}",
            d=point.dec, a=point.ra, d0=_num(dec0), a0=_num(ra0),
            c0=_num(math.cos(math.radians(dec0))), h=_num(limit),
        )  # fmt: skip
        low, high = _num(dec0 - radius), _num(dec0 + radius)
        return exp.and_(
            _sql("{p} BETWEEN {low} AND {high}", p=point.dec, low=low, high=high), exact
        )
    if isinstance(region, _Circle):
        exact = _sql("{d} <= {r}", d=_distance(point, region.center), r=region.radius)
        c = region.center.dec
        near = _sql("{p} BETWEEN {c} - {r} AND {c} + {r}", p=point.dec, c=c, r=region.radius)
        return exp.and_(near, exact)
    x = _sql("COS(RADIANS({d})) * COS(RADIANS({a}))", a=point.ra, d=point.dec)
    y = _sql("COS(RADIANS({d})) * SIN(RADIANS({a}))", a=point.ra, d=point.dec)
    z = _sql("SIN(RADIANS({d}))", d=point.dec)
    sides = [
        _sql(
            f"{n[0]!r} * {{x}} + {n[1]!r} * {{y}} + {n[2]!r} * {{z}} >= 0",
            x=x,
            y=y,
            z=z,
        )
        for n in _normals(region.vertices)
    ]
    return exp.and_(*sides)


def _predicate(node: exp.Expr) -> exp.Expr:
    """CONTAINS(a, b) or INTERSECTS(a, b) as a condition."""
    name = _name(node)
    args = _args(node)
    if len(args) != 2:
        raise AdqlError(f"{name}: expected two regions")
    a, b = (_shape(x) for x in args)
    if name == "INTERSECTS" and isinstance(b, _Point):
        a, b = b, a
    if isinstance(a, _Point) and isinstance(b, (_Circle, _Polygon)):
        return exp.paren(_inside(a, b))
    if name == "INTERSECTS" and isinstance(a, _Circle) and isinstance(b, _Circle):
        d = _distance(a.center, b.center)
        return _sql("{d} <= {r1} + {r2}", d=d, r1=a.radius, r2=b.radius)
    if name == "CONTAINS" and isinstance(a, _Circle) and isinstance(b, _Circle):
        d = _distance(a.center, b.center)
        return _sql("{d} + {r1} <= {r2}", d=d, r1=a.radius, r2=b.radius)
    raise AdqlError(
        f"{name}: supported for a POINT and a CIRCLE, POLYGON or BOX, and for two CIRCLEs"
    )


def _is_one(node: exp.Expr) -> bool:
    return isinstance(node, exp.Literal) and not node.is_string and node.this == "1"


def _geometry(node: exp.Expr, obscore: str | None, sky: SkyIndex, cones: list[str]) -> exp.Expr:
    if isinstance(node, exp.EQ):
        left, right = node.this, node.expression
        predicate = (
            right if _is_one(left) and _name(right) in _PREDICATES
            else left if _is_one(right) and _name(left) in _PREDICATES
            else None
        )  # fmt: skip
        if predicate is None:
            return node
        exact = _predicate(predicate)
        found = _cone(node, predicate, obscore) if obscore else None
        if found is None:
            return exact
        cones.append(found[0])
        first = _prefilter(sky, *found)
        return exp.paren(exp.and_(first, exact)) if first is not None else exact
    name = _name(node)
    if name in _PREDICATES:
        return _sql("CASE WHEN {c} THEN 1 ELSE 0 END", c=_predicate(node))
    if name == "DISTANCE":
        args = _args(node)
        if len(args) == 4:
            return _distance(_Point(args[0], args[1]), _Point(args[2], args[3]))
        shapes = [_shape(a) for a in args]
        if len(shapes) != 2 or not all(isinstance(s, _Point) for s in shapes):
            raise AdqlError("DISTANCE: expected two POINTs (or four numbers)")
        return _distance(*shapes)  # type: ignore[arg-type]
    if name in _GEOMETRY:
        raise AdqlError(f"{name}: a region is only allowed inside CONTAINS, INTERSECTS or DISTANCE")
    return node


# ------------------------------------------------------------------ the sky index


def _cone(
    node: exp.Expr, predicate: exp.Expr, obscore: str
) -> tuple[str, exp.Column, exp.Column, tuple[float, float, float]] | None:
    """Where ``node`` (``1 = predicate``) asks for ObsCore's position in a region that
    may be read from the sky index: ObsCore's alias, its ``s_ra`` and ``s_dec``, and a
    circle holding the region (ra, dec, radius). None unless ``node`` is one of the
    ANDed conditions of a ``WHERE``, its point ObsCore's own ``s_ra`` and ``s_dec``,
    its region a circle or polygon of numbers."""
    where = _conjunct_of(node)
    if where is None:
        return None
    args = _args(predicate)
    if len(args) != 2:
        return None
    a, b = (_shape(x) for x in args)
    if _name(predicate) == "INTERSECTS" and isinstance(b, _Point):
        a, b = b, a
    if not isinstance(a, _Point) or isinstance(b, _Point):
        return None
    ra, dec = a.ra, a.dec
    if not (isinstance(ra, exp.Column) and isinstance(dec, exp.Column)):
        return None
    if (ra.name, dec.name) != ("s_ra", "s_dec") or ra.table != dec.table:
        return None
    alias = _alias_of(where, obscore, ra.table)
    cap = _cap(b)
    if alias is None or cap is None:
        return None
    return alias, ra, dec, cap


def _prefilter(
    sky: SkyIndex, alias: str, ra: exp.Column, dec: exp.Column, cap: tuple[float, float, float]
) -> exp.Expr | None:
    """A condition that reads the sky index, true of every position within ``cap``."""
    if sky is SkyIndex.NONE:
        return None
    if sky is SkyIndex.Q3C:
        values = [ra.copy(), dec.copy(), *(_num(v) for v in (cap[0], cap[1], cap[2] + MARGIN_DEG))]
        return exp.Anonymous(this="q3c_radial_query", expressions=values)
    ids: exp.Query | None = None
    for box in boxes(*cap):
        bounds = [_cmp(exp.GTE, "dec_max", box.dec_min), _cmp(exp.LTE, "dec_min", box.dec_max)]
        if (box.ra_min, box.ra_max) != (0.0, 360.0):
            bounds += [_cmp(exp.GTE, "ra_max", box.ra_min), _cmp(exp.LTE, "ra_min", box.ra_max)]
        one = _select("id", SKY_TABLE, exp.and_(*bounds))
        ids = one if ids is None else exp.union(ids, one, distinct=False)
    assert ids is not None
    in_box = exp.In(this=exp.column("id"), query=exp.Subquery(this=ids))
    files = _select("archive_id", "files", in_box)
    return exp.In(this=exp.column("obs_id", table=alias), query=exp.Subquery(this=files))


def _conjunct_of(node: exp.Expr) -> exp.Select | None:
    """The ``SELECT`` whose ``WHERE`` holds ``node`` as one of its ANDed conditions."""
    parent = node.parent
    while isinstance(parent, (exp.And, exp.Paren)):
        parent = parent.parent
    if isinstance(parent, exp.Where) and isinstance(parent.parent, exp.Select):
        return parent.parent
    return None


def _alias_of(select: exp.Select, obscore: str, qualifier: str) -> str | None:
    """The name ``select`` reads ObsCore under (``qualifier``'s, or its only table's)."""
    found = select.args.get("from_")
    sources = [found.this] if isinstance(found, exp.From) else []
    sources += [j.this for j in select.args.get("joins") or []]
    if not qualifier and len(sources) != 1:
        return None
    for source in sources:
        mine = isinstance(source, exp.Table) and source.name == obscore and not source.db
        if mine and (not qualifier or source.alias_or_name == qualifier):
            return str(source.alias_or_name)
    return None


def _cap(region: _Circle | _Polygon) -> tuple[float, float, float] | None:
    """A circle (ra, dec, radius; degrees) holding ``region``, if its numbers are known
    and it is smaller than a hemisphere."""
    if isinstance(region, _Circle):
        try:
            ra = _number(region.center.ra, "CIRCLE")
            dec = _number(region.center.dec, "CIRCLE")
            radius = _number(region.radius, "CIRCLE")
        except AdqlError:
            return None  # a column, say: no prefilter
        cap = (ra, dec, radius)
    else:
        points = [_vector(*v) for v in region.vertices]
        total = [sum(p[i] for p in points) for i in range(3)]
        norm = math.sqrt(_dot((total[0], total[1], total[2]), (total[0], total[1], total[2])))
        if norm == 0.0:
            return None
        x, y, z = (t / norm for t in total)
        centre = (x, y, z)
        widest = max(math.acos(max(-1.0, min(1.0, _dot(centre, p)))) for p in points)
        ra = math.degrees(math.atan2(y, x)) % 360.0
        cap = (ra, math.degrees(math.asin(max(-1.0, min(1.0, z)))), math.degrees(widest))
    usable = all(math.isfinite(v) for v in cap) and 0.0 <= cap[2] < 90.0 and abs(cap[1]) <= 90.0
    return cap if usable else None


def _num(value: float) -> exp.Expr:
    number = exp.Literal.number(repr(abs(value)))
    return exp.Neg(this=number) if value < 0 else number


def _cmp(kind: type[exp.Binary], column: str, value: float) -> exp.Expr:
    return kind(this=exp.column(column), expression=_num(value))


def _select(column: str, table: str, where: exp.Expr) -> exp.Select:
    return exp.Select(
        expressions=[exp.column(column)],
        from_=exp.From(this=exp.to_table(table)),
        where=exp.Where(this=where),
    )
