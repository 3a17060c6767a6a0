"""The Virtual Observatory's services on the API server, beside ``/api/v1``: TAP 1.1
(``/tap``: ADQL over ObsCore and TAP_SCHEMA, sync and async, VOSI), DataLink 1.1
(``/datalink``) and SODA 1.0 (``/soda``). Mounted by :func:`obsflow.ivoa.tap.install`;
their SQL is in :mod:`obsflow.catalog.obscore`; who may read what is
:class:`obsflow.access.ReadRule`, as everywhere."""
