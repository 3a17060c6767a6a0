"""Real-world FITS files: the test files that ship with astropy (random groups, compressed
images, ASCII and binary tables with heaps, variable-length arrays, an HST raw file,
pre-2000 dates, scaled and blank data ...) through receipt and ingest under a catch-all
product. Every file astropy reads is archived with its bytes unchanged and its archived
keywords as astropy reads them; one astropy cannot read is refused with its reason.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import astropy
import pytest
from astropy.io import fits

from obsflow.catalog.records import FileQuery
from obsflow.settings import Settings
from obsflow.site import ingest_paths, open_site
from obsflow.states import FileState
from tests.conftest import SiteFactory

DATA = Path(astropy.__file__).parent / "io" / "fits" / "tests" / "data"
KEYWORDS = ("OBJECT", "TELESCOP", "INSTRUME", "DATE-OBS", "ORIGIN", "BITPIX", "NAXIS", "GROUPS")
CATCH_ALL = f"""\
instrument:
  name: ANY
  prefix: AN
  keywords: {{exptime: null, ra: null, dec: null, object: null, frame_type: null,
             filter: null, observer: null, telescope: null}}
products:
  - id: any_fits
    level: 0
    instrument: ANY
    filename: '(?P<stem>.+)\\.fits'
    time: {{from: mtime}}          # most of these files carry no time at all
    keywords: [{", ".join(KEYWORDS)}]
"""


def astropy_reads(path: Path) -> fits.Header | None:
    """The primary header as astropy reads it from the file, if astropy opens and verifies
    the file and reads every HDU's header (a warning, such as a fix, is an error here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with fits.open(path) as hdul:
                hdul.verify("exception")
                for hdu in hdul:
                    _ = hdu.header
            # the primary header as written: no HDU class's fix-ups (a GroupsHDU's NAXIS)
            with path.open("rb") as fh:
                return fits.Header.fromfile(fh)
    except Exception:  # any failure means: not a file astropy reads
        return None


@pytest.fixture
def catch_all(make_site: SiteFactory) -> Settings:
    settings = make_site()
    for path in settings.registry.glob("*.yaml"):
        path.unlink()
    (settings.registry / "any.yaml").write_text(CATCH_ALL)
    return settings


def test_every_fits_file_astropy_ships_is_archived_as_astropy_reads_it(
    catch_all: Settings,
) -> None:
    sources = sorted(DATA.rglob("*.fits"))
    assert len(sources) >= 20, f"astropy's test files are not at {DATA}"
    readable = {p.name: astropy_reads(p) for p in sources}
    incoming = catch_all.incoming
    copies = []
    for index, source in enumerate(sources):
        copy = incoming / f"{index:02d}_{source.name}"  # invalid/ holds a name of its own
        shutil.copyfile(source, copy)
        copies.append((source, copy))
    site = open_site(catch_all)
    try:
        summary = ingest_paths(site, [copy for _, copy in copies])
        records = {r.original_name: r for r in site.catalog.find(FileQuery())}
        for source, copy in copies:
            record = records.get(copy.name)
            header = readable[source.name]
            if header is None:  # not valid as it is: refused with a reason, or kept whole
                assert record is not None, f"{source.name}: lost without a word"
                if record.state is FileState.REJECTED:
                    assert record.reason, source.name
                else:
                    assert record.archive_path is not None
                    stored = (catch_all.archive / record.archive_path).read_bytes()
                    assert stored == source.read_bytes(), source.name
                continue
            assert record is not None, f"{source.name}: not received"
            assert record.state is FileState.ARCHIVED, (source.name, record.reason)
            assert record.archive_path is not None
            stored = (catch_all.archive / record.archive_path).read_bytes()
            assert stored == source.read_bytes(), source.name
            assert record.sha256 == hashlib.sha256(stored).hexdigest()
            for key in KEYWORDS:
                if key in header:
                    assert key in record.keywords, (source.name, key)
                    assert record.keywords[key] == header[key], (source.name, key)
                    assert type(record.keywords[key]) is type(header[key]), (source.name, key)
    finally:
        site.close()
    valid = [copy.name for source, copy in copies if readable[source.name] is not None]
    assert len(valid) >= 20
    assert all(records[name].state is FileState.ARCHIVED for name in valid)
    assert not summary.ingest.errors
