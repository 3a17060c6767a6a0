"""Who may see what (:mod:`obsflow.access`): the access matrix on a real ingested file,
tokens in a real catalog (SQLite and PostgreSQL), and ``obsflow token`` as a real
subprocess.

The matrix takes the file's program and release date as receipt set them from the
example registry (OFCAM: 18 months), and looks at it one second before and at the
instant of its release.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from obsflow.access import (
    ADMIN_FIELDS,
    ANONYMOUS,
    PUBLIC_FIELDS,
    AccessError,
    Principal,
    ReadRule,
    Scope,
    TokenStore,
    may_read_data,
    released,
    visible_fields,
)
from obsflow.catalog import Catalog, NewFile, schema
from obsflow.catalog.records import FileQuery, FileRecord
from obsflow.receipt.metadata import add_months
from obsflow.settings import Settings
from obsflow.site import Site, ingest_paths, open_site
from obsflow.states import LedgerEvent
from tests.conftest import SiteFactory

NOW = datetime(2027, 3, 1, 12, tzinfo=UTC)
ALL_FIELDS = frozenset(f.name for f in dataclasses.fields(FileRecord))
DATA_FIELDS = ALL_FIELDS - ADMIN_FIELDS
SECRET_FIELDS = ("object", "ra", "dec", "observer", "keywords", "original_name", "sha256")


# ------------------------------------------------------------------ pure policy


def test_field_sets_are_fields_of_a_record_and_disjoint() -> None:
    assert PUBLIC_FIELDS <= ALL_FIELDS
    assert ADMIN_FIELDS <= ALL_FIELDS
    assert not PUBLIC_FIELDS & ADMIN_FIELDS
    assert {"source_path", "cache_path", "archive_path", "quarantine_path"} <= ADMIN_FIELDS
    assert not set(SECRET_FIELDS) & PUBLIC_FIELDS
    assert "proprietary" not in ALL_FIELDS  # the marker cannot be mistaken for a field


@pytest.mark.parametrize(
    ("held", "asked", "may"),
    [
        (Scope.READ, Scope.READ, True),
        (Scope.READ, Scope.WRITE, False),
        (Scope.READ, Scope.ADMIN, False),
        (Scope.WRITE, Scope.READ, True),
        (Scope.WRITE, Scope.WRITE, True),
        (Scope.WRITE, Scope.ADMIN, False),
        (Scope.ADMIN, Scope.READ, True),
        (Scope.ADMIN, Scope.WRITE, True),
        (Scope.ADMIN, Scope.ADMIN, True),
    ],
)
def test_scopes_are_ordered(held: Scope, asked: Scope, may: bool) -> None:
    assert Principal("u", held, frozenset(), 1).may(asked) is may


@pytest.mark.parametrize(
    ("held", "asked", "may"),
    [
        (Scope.WORKER, Scope.READ, True),
        (Scope.WORKER, Scope.WORKER, True),
        (Scope.WORKER, Scope.WRITE, False),  # no tags, no retries, no transfers
        (Scope.WORKER, Scope.ADMIN, False),
        (Scope.READ, Scope.WORKER, False),
        (Scope.WRITE, Scope.WORKER, False),  # a writer may not report runs
        (Scope.ADMIN, Scope.WORKER, True),
    ],
)
def test_the_worker_scope_sits_beside_write_not_above_it(
    held: Scope, asked: Scope, may: bool
) -> None:
    assert Principal("u", held, frozenset(), 1).may(asked) is may


def test_a_worker_reads_every_file_but_never_a_path_and_sends_no_frame(
    record: FileRecord,
) -> None:
    assert record.proprietary_until is not None and record.program is not None
    worker = Principal("w", Scope.WORKER, frozenset(), 1)
    before = record.proprietary_until - timedelta(days=1)
    assert may_read_data(worker, record, before)  # proprietary: it reduces it anyway
    shown = visible_fields(worker, record, before)
    assert set(shown) == DATA_FIELDS and "proprietary" not in shown
    assert not worker.may_send("OFCAM")


def test_anonymous_reads_only() -> None:
    assert ANONYMOUS.anonymous and ANONYMOUS.may(Scope.READ)
    assert not ANONYMOUS.may(Scope.WRITE) and not ANONYMOUS.programs
    assert not Principal("u", Scope.READ, frozenset(), 7).anonymous


# ------------------------------------------------------------------ the matrix


@pytest.fixture
def record(site: Site, frames: list[Path]) -> FileRecord:
    """A real file, as receipt recorded it: its program and release date from the registry."""
    summary = ingest_paths(site, frames)
    assert not summary.ingest.errors
    found = site.catalog.find(FileQuery())
    return next(r for r in found if r.frame_type == "OBJECT")  # with an object, RA, Dec


def test_receipt_sets_the_release_date_from_the_registry(record: FileRecord) -> None:
    assert record.program and record.proprietary_until and record.start
    assert record.proprietary_until == add_months(record.start, 18)  # OFCAM: 18 months
    assert record.source_path and record.archive_path  # something for ADMIN_FIELDS to hide


def test_access_matrix(site: Site, record: FileRecord) -> None:
    assert record.program is not None and record.proprietary_until is not None
    store = TokenStore(site.catalog)
    own = record.program
    principals: dict[str, Principal] = {"anonymous": ANONYMOUS}
    for name, scope, programs in [
        ("other", Scope.READ, ["2026B-U999"]),
        ("own", Scope.READ, [own]),
        ("own-write", Scope.WRITE, ["2026B-U999", own]),
        ("other-write", Scope.WRITE, ["2026B-U999"]),
        ("admin", Scope.ADMIN, []),
    ]:
        secret, _ = store.create(name, scope, programs, NOW)
        verified = store.verify(secret)
        assert verified is not None
        principals[name] = verified
    before = record.proprietary_until - timedelta(seconds=1)
    after = record.proprietary_until  # released at that instant
    public = PUBLIC_FIELDS | {"proprietary"}
    # who, when → may read the data, which keys are shown
    table: list[tuple[str, datetime, bool, frozenset[str]]] = [
        ("anonymous", before, False, public),
        ("anonymous", after, True, DATA_FIELDS),
        ("other", before, False, public),
        ("other", after, True, DATA_FIELDS),
        ("other-write", before, False, public),
        ("other-write", after, True, DATA_FIELDS),
        ("own", before, True, DATA_FIELDS),
        ("own", after, True, DATA_FIELDS),
        ("own-write", before, True, DATA_FIELDS),
        ("own-write", after, True, DATA_FIELDS),
        ("admin", before, True, ALL_FIELDS),
        ("admin", after, True, ALL_FIELDS),
    ]
    wrong = []
    for who, when, may, keys in table:
        label = f"{who} {'before' if when == before else 'after'} release"
        principal = principals[who]
        shown = visible_fields(principal, record, when)
        if may_read_data(principal, record, when) is not may:
            wrong.append(f"{label}: may_read_data is not {may}")
        if set(shown) != keys:
            wrong.append(f"{label}: shows {sorted(set(shown) ^ keys)} wrongly")
        if not may:
            assert shown["proprietary"] is True
            text = json.dumps(shown)
            for name in SECRET_FIELDS:
                value = getattr(record, name)
                if value not in (None, {}, ()):
                    assert str(value) not in text, f"{label}: {name} leaks"
        if who != "admin":
            for name in ("source_path", "cache_path", "archive_path"):
                value = getattr(record, name)
                assert value is None or value not in json.dumps(shown), f"{label}: {name} leaks"
        else:
            assert shown == record.to_json()
        for name in keys & ALL_FIELDS:
            assert shown[name] == record.to_json()[name], f"{label}: {name} altered"
    assert not wrong, "\n".join(wrong)


def test_a_file_without_release_date_is_public(record: FileRecord) -> None:
    public = dataclasses.replace(record, proprietary_until=None)
    assert released(public, NOW)
    assert may_read_data(ANONYMOUS, public, NOW)
    assert set(visible_fields(ANONYMOUS, public, NOW)) == DATA_FIELDS
    nobody = dataclasses.replace(record, program=None, proprietary_until=NOW + timedelta(days=1))
    reader = Principal("u", Scope.WRITE, frozenset({"ENG"}), 1)
    assert not may_read_data(reader, nobody, NOW)  # no program: admin only until released


# ------------------------------------------------------------------ the rule, twice


def test_the_sql_form_of_the_rule_selects_exactly_what_the_python_form_accepts(
    catalog_url: str,
) -> None:
    """ReadRule.sql (the catalog's filter) and ReadRule.accepts (may_read_data) agree for
    every kind of file and reader, on each engine: released long ago, at this very
    instant, a microsecond later, never proprietary; of one program, another, none."""
    catalog = Catalog.open(catalog_url)
    try:
        releases = {
            "public": None,
            "released": NOW - timedelta(days=400),
            "at-now": NOW,  # released at that instant
            "now+1us": NOW + timedelta(microseconds=1),
            "next-year": NOW + timedelta(days=365),
        }
        n = 0
        for program in ("A", "B", None):
            for until in releases.values():
                n += 1
                new = NewFile(
                    product="ofcam_raw",
                    instrument="OFCAM",
                    level=0,
                    original_name=f"f{n}.fits",
                    source_path=f"/in/f{n}.fits",
                    size=n,
                    sha256=f"{n:064x}",
                    program=program,
                    proprietary_until=until,
                )
                catalog.record_cached(
                    new,
                    make_archive_id=f"OF.f{n}.{{:02d}}".format,
                    cache_path=lambda aid: aid,
                    place=lambda aid: None,
                    ledger={LedgerEvent.CACHED: NOW},
                    now=NOW,
                )
        records = catalog.find(FileQuery())
        assert len(records) == 15
        readers = {
            "anonymous": ANONYMOUS,
            "other program": Principal("o", Scope.READ, frozenset({"C"}), 1),
            "own program": Principal("a", Scope.READ, frozenset({"A"}), 2),
            "two programs, write": Principal("w", Scope.WRITE, frozenset({"A", "B"}), 3),
            "admin": Principal("root", Scope.ADMIN, frozenset(), 4),
            "worker": Principal("w", Scope.WORKER, frozenset(), 5),
        }
        for label, who in readers.items():
            rule = ReadRule.of(who, NOW)
            selected = [r.id for r in catalog.find(FileQuery(readable_by=rule))]
            accepted = [r.id for r in records if may_read_data(who, r, NOW)]
            assert accepted == [r.id for r in records if rule.accepts(r)]
            assert selected == accepted, label
        # the cases are not all alike: public files for everyone, more for a program, all
        # for admin
        counts = {
            label: len(catalog.find(FileQuery(readable_by=ReadRule.of(who, NOW))))
            for label, who in readers.items()
        }
        assert counts == {
            "anonymous": 9,  # public, released, at-now, of each program
            "other program": 9,
            "own program": 11,  # and A's two not yet released
            "two programs, write": 13,
            "admin": 15,
            "worker": 15,  # it reduces every frame
        }
    finally:
        catalog.close()


# ------------------------------------------------------------------ tokens


def test_token_create_verify_revoke(site: Site) -> None:
    store = TokenStore(site.catalog)
    secret, made = store.create("ana@obs.org", Scope.WRITE, ["2026B-U017", "ENG", "ENG"], NOW)
    assert made == Principal("ana@obs.org", Scope.WRITE, frozenset({"2026B-U017", "ENG"}), 1)
    assert store.verify(secret) == made
    other, _ = store.create("bob", Scope.READ, [], NOW)
    assert other != secret and store.verify(other) == Principal("bob", Scope.READ, frozenset(), 2)

    with site.catalog.read() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(schema.tokens))]
    assert len(rows) == 2
    row = rows[0]
    assert row["token_hash"] == hashlib.sha256(secret.encode()).hexdigest() != secret
    body = secret.removeprefix("obf_")
    for value in (v for r in rows for v in r.values()):
        assert body not in str(value)  # no secret, nor its random part, in any column
    assert json.loads(row["programs"]) == ["2026B-U017", "ENG"]

    listed = [t.to_json() for t in store.list()]
    assert [t["user"] for t in listed] == ["ana@obs.org", "bob"]
    assert body not in json.dumps(listed) and row["token_hash"] not in json.dumps(listed)

    assert store.revoke(1, NOW + timedelta(hours=1))
    assert store.verify(secret) is None
    assert store.verify(other) is not None  # only that one
    assert not store.revoke(1, NOW + timedelta(hours=2))  # already revoked
    assert not store.revoke(99, NOW)
    info = store.get(1)
    assert info is not None and not info.active
    assert info.revoked == NOW + timedelta(hours=1)
    assert store.get(99) is None


def test_a_token_row_edited_by_hand_is_refused_loudly(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    store = TokenStore(site.catalog)
    lists, _ = store.create("ana", Scope.READ, ["A"], NOW)
    scope, _ = store.create("bob", Scope.READ, [], NOW)
    fine, _ = store.create("cy", Scope.READ, [], NOW)
    with site.catalog.write() as conn:
        tokens = schema.tokens
        conn.execute(update(tokens).where(tokens.c.id == 1).values(programs='{"A": 1}'))
        conn.execute(update(tokens).where(tokens.c.id == 2).values(scope="root"))
    assert store.verify(lists) is None and store.verify(scope) is None
    assert store.verify(fine) is not None
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(said) == 2 and "token 1" in said[0] and "token 2" in said[1], said


def _garbage(secret: str) -> Iterator[Any]:
    yield from ("", " ", "obf_", "obf", secret[:-1], secret + "x", secret + "\n", " " + secret)
    yield secret.upper()
    yield "obf_" + "A" * 43  # the right shape, but no such token
    yield "obf_" + "é" * 43
    yield "obf_" + "\x00" * 43
    yield secret[:10] + "\x00" + secret[11:]
    yield "obf_" + "🔑" * 43
    yield "\ud800" * 47  # a lone surrogate: cannot even be encoded
    yield "x" * 10_000_000
    yield hashlib.sha256(secret.encode()).hexdigest()  # the stored hash is not a token
    yield None
    yield secret.encode()
    yield 12345


def test_garbage_never_verifies_and_never_raises(site: Site) -> None:
    store = TokenStore(site.catalog)
    secret, _ = store.create("ana", Scope.ADMIN, [], NOW)
    for bad in _garbage(secret):
        assert store.verify(bad) is None, repr(bad)[:60]
    assert store.verify(secret) is not None


@pytest.mark.parametrize(
    ("user", "programs", "culprit"),
    [
        ("", [], "''"),
        ("a b", [], "'a b'"),
        ("x" * 65, [], "x" * 65),
        ("ana;drop", [], "ana;drop"),
        ("Ånа", [], "Ånа"),  # not ASCII (and a Cyrillic а)
        ("anonymous", [], "anonymous"),
        ("ana", ["U017", "a/b"], "a/b"),
        ("ana", [""], "''"),
        ("ana", ["x" * 65], "x" * 65),
    ],
)
def test_bad_names_are_refused_by_name(
    make_site: SiteFactory, user: str, programs: list[str], culprit: str
) -> None:
    s = open_site(make_site())
    try:
        with pytest.raises(AccessError, match=culprit):
            TokenStore(s.catalog).create(user, Scope.READ, programs, NOW)
        with pytest.raises(AccessError, match="unknown scope 'root'"):
            TokenStore(s.catalog).create("ana", "root", [], NOW)  # type: ignore[arg-type]
        assert TokenStore(s.catalog).list() == []
    finally:
        s.close()


# ------------------------------------------------------------------ the CLI

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
"""The commands only call TokenStore, which is tested on both engines above."""


@functools.cache
def _registered() -> bool:
    """Whether ``obsflow.cli`` registers the token commands itself."""
    probe = "import obsflow.cli as c; print('token' in {g.name for g in c.app.registered_groups})"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip() == "True"


def token(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m obsflow token ARGS``: through a prelude that imports the commands
    while ``obsflow.cli`` does not register them yet."""
    if _registered():
        command = [sys.executable, "-m", "obsflow"]
    else:
        prelude = "import obsflow.cli.tokens; from obsflow.cli import main; main()"
        command = [sys.executable, "-c", prelude]
    return subprocess.run(
        [*command, "token", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def _verify(settings: Settings, secret: str) -> Principal | None:
    s = open_site(settings)
    try:
        return TokenStore(s.catalog).verify(secret)
    finally:
        s.close()


@SQLITE_ONLY
def test_token_commands(make_site: SiteFactory) -> None:
    settings = make_site()
    site = settings.site
    made = token("create", "--site", site, "--user", "ana", "--scope", "write",
                 "--program", "2026B-U017", "--program", "ENG")  # fmt: skip
    assert made.returncode == 0, made.stderr
    [secret] = made.stdout.splitlines()  # the secret alone, on its own line
    assert secret.startswith("obf_")
    assert "shown this once" in made.stderr and secret not in made.stderr
    assert _verify(settings, secret) == Principal(
        "ana", Scope.WRITE, frozenset({"2026B-U017", "ENG"}), 1
    )

    made = token("create", "--site", site, "--user", "ops", "--scope", "admin", "--json")
    assert made.returncode == 0, made.stderr
    data = json.loads(made.stdout)
    admin = data.pop("token")
    assert data == {"id": 2, "user": "ops", "scope": "admin", "programs": [], "instruments": []}
    assert admin != secret and _verify(settings, admin) == Principal(
        "ops", Scope.ADMIN, frozenset(), 2
    )

    listed = token("list", "--site", site, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(t["id"], t["user"], t["scope"], t["programs"], t["revoked"])
            for t in json.loads(listed.stdout)] == [
        (1, "ana", "write", ["2026B-U017", "ENG"], None),
        (2, "ops", "admin", [], None),
    ]  # fmt: skip
    table = token("list", "--site", site)
    for shown in (listed, table):
        assert shown.returncode == 0, shown.stderr
        for s in (secret, admin):
            assert s.removeprefix("obf_") not in shown.stdout + shown.stderr
            assert hashlib.sha256(s.encode()).hexdigest() not in shown.stdout

    revoked = token("revoke", "--site", site, "1")
    assert revoked.returncode == 0, revoked.stderr
    assert "token 1 revoked" in revoked.stdout
    assert _verify(settings, secret) is None
    assert _verify(settings, admin) is not None
    again = token("revoke", "--site", site, "1")
    assert again.returncode == 0 and "already revoked" in again.stdout
    missing = token("revoke", "--site", site, "99")
    assert missing.returncode == 1 and "no token 99" in missing.stderr
    listed = token("list", "--site", site, "--json")
    assert [t["revoked"] is not None for t in json.loads(listed.stdout)] == [True, False]


@SQLITE_ONLY
def test_token_create_makes_a_worker_token(make_site: SiteFactory) -> None:
    settings = make_site()
    made = token("create", "--site", settings.site, "--user", "node7", "--scope", "worker")
    assert made.returncode == 0, made.stderr
    [secret] = made.stdout.splitlines()
    assert "scope worker" in made.stderr
    assert _verify(settings, secret) == Principal("node7", Scope.WORKER, frozenset(), 1)
    helped = token("create", "--help")
    assert "worker" in helped.stdout


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--user", "ana", "--scope", "root"], ["--scope", "root"]),
        (["--user", "a b", "--scope", "read"], ["--user", "bad user name 'a b'"]),
        (["--user", "ana", "--scope", "read", "--program", "a/b"], ["--program", "'a/b'"]),
        (["--scope", "read"], ["--user"]),
    ],
)
def test_token_create_refuses_bad_input(
    make_site: SiteFactory, args: list[str], says: list[str]
) -> None:
    settings = make_site()
    done = token("create", "--site", settings.site, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert not done.stdout
    for words in says:
        assert words in done.stderr
    s = open_site(settings)
    try:
        assert TokenStore(s.catalog).list() == []
    finally:
        s.close()
