"""Every error obsflow raises on purpose, as one small tree.

A name without a module is defined here, in :mod:`obsflow.errors`; ``module.Name`` is
defined in ``obsflow.module`` (and so are its children that name no module of their own).
``tests/test_health.py`` holds this tree to the classes the code defines.

::

    ObsflowError
    ├── ConfigError            a settings or registry file is wrong (file:line: what, expected)
    │   ├── SettingsError      obsflow.yaml
    │   └── RegistryError      a registry YAML file; may hold many problems at once
    ├── ReceiptError           a file was refused at receipt; it goes to quarantine
    │   ├── FitsError          not FITS, truncated, header without END, bad card
    │   ├── MetadataError      a required keyword is missing or cannot be parsed
    │   ├── RecognitionError   the filename matches no product
    │   │   └── AmbiguousError the filename matches two or more products
    │   └── VanishedError      the file disappeared or changed while being received
    ├── CatalogError           the catalog database cannot be reached, migrated or written
    │   ├── CatalogUnavailableError  not now (the server is down, a lock held too long):
    │   │                            a daemon or worker starting up tries again
    │   └── SchemaError        the catalog's schema is older (obsflow migrate) or newer
    │                          (a newer obsflow made it) than this obsflow's
    ├── StorageError           archive storage could not store or verify a file
    │   └── transfer.client.TransferError  a frame did not reach the archive server this time
    │       ├── BusyError      the server asked to wait (503 Retry-After, upload in progress)
    │       ├── PendingError   the server cached it, has not archived it yet
    │       ├── RefusedError   the server refused the bytes (a wrong checksum, a bad file)
    │       ├── ConflictError  the server holds other bytes under its archive ID
    │       └── DeniedError    the server refused the agent's token
    ├── RunError               a pipeline run could not be built, started or published
    │   ├── ProfileError       a profile cannot be filled for a run (names run, step, placeholder)
    │   └── processing.serverhost.ServerError  a worker's call to the server failed
    ├── NotFoundError          no (live) file with this archive ID
    ├── processing.celery.BrokerError  no broker, or it cannot take a run
    ├── processing.reductions.ReductionError  a reduction that cannot be made as asked
    ├── catalog.tags.InvalidTagError  a tag that does not follow the registry's rule
    ├── catalog.obscore.QueryError  a translated TAP query the database refused, or out of time
    ├── ivoa.adql.AdqlError    an ADQL query obsflow cannot run (syntax, unknown table/function)
    ├── ivoa.tap.TapError      a TAP request obsflow cannot answer (names the parameter)
    ├── ivoa.uws.UwsError      an async TAP job request that cannot be done (says why)
    ├── ivoa.votable.FormatError  a FORMAT naming no format obsflow writes
    ├── ivoa.datalink.DatasetError  an ID names no dataset the reader may see
    ├── ivoa.soda.SodaError    a cutout obsflow cannot make (starts with DALI's fault name)
    ├── access.AccessError     a bad user, program or scope name
    ├── api.ListenError        the API cannot listen where asked (a bad HOST:PORT, in use)
    ├── sim.ioc.PublishError   the simulated IOC is not running or cannot be reached
    ├── tools.BadInputError    a science tool's input is missing or unfit (the step exits 2)
    ├── tools.UsageError       a science tool's command line is wrong (the step exits 2)
    └── SiteError              the site directory is missing or not a site

A step that cannot be started (a missing program) is no error: the controller records
it as a failed attempt of the step, with the reason (``cannot start: ...``).

Three exceptions stay outside the tree on purpose, because none leaves its own layer:

* ``registry.expression.ExpressionError`` (a ``ValueError``, so that pydantic reports it
  as a problem of the registry file, which becomes a :class:`RegistryError`);
* ``api.problems.ProblemError`` (a handler's way to answer with a problem detail);
* ``api.data.UnsatisfiableError`` (a byte range past the end: the API answers 416).

Messages name the culprit (the file and line, the path, the product, the archive ID)
so that an operator can act on the message alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class ObsflowError(Exception):
    """The root of every error obsflow raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in one configuration file, at one line."""

    file: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else f"{self.file}"
        return f"{where}: {self.message}"


class ConfigError(ObsflowError):
    """A configuration file (settings or registry) is wrong.

    Holds every problem found, each as ``file:line: what is wrong, what was expected``.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class SettingsError(ConfigError):
    """The site's ``obsflow.yaml`` is wrong."""


class RegistryError(ConfigError):
    """One or more registry files are wrong."""


class ReceiptError(ObsflowError):
    """A file was refused at receipt. ``reason`` is a short machine-readable code."""

    reason: str = "refused"

    def __init__(self, path: Path | str, detail: str) -> None:
        self.path = Path(path)
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")


class FitsError(ReceiptError):
    """The bytes are not a complete, well-formed FITS file."""

    reason = "invalid-fits"


class MetadataError(ReceiptError):
    """A required header keyword is missing or its value cannot be parsed."""

    reason = "bad-metadata"


class RecognitionError(ReceiptError):
    """The filename matches no registered product, or more than one."""

    reason = "unrecognised"


class AmbiguousError(RecognitionError):
    """The filename matches two or more products."""

    reason = "ambiguous"


class VanishedError(ReceiptError):
    """The file disappeared, or kept changing, while it was being received."""

    reason = "vanished"


class CatalogError(ObsflowError):
    """The catalog database cannot be reached, migrated or written."""


class CatalogUnavailableError(CatalogError):
    """The catalog cannot be reached now; trying again later may succeed."""


class SchemaError(CatalogError):
    """The catalog's schema is not the one this obsflow reads: older (``obsflow
    migrate`` upgrades it, explicitly) or newer (made by a newer obsflow)."""


class StorageError(ObsflowError):
    """Archive storage could not store, read or verify a file."""


class RunError(ObsflowError):
    """A pipeline run could not be built, started or published."""


class ProfileError(RunError):
    """A profile cannot be filled for a run: a missing parameter, input or output."""


class NotFoundError(ObsflowError):
    """No live file has this archive ID (unknown, or refused and quarantined)."""

    def __init__(self, archive_id: str) -> None:
        self.archive_id = archive_id
        super().__init__(f"no file with archive ID {archive_id!r}")


class SiteError(ObsflowError):
    """The site directory is missing, or is not an obsflow site."""
