"""ObsCore 1.1 (``ivoa.obscore``): its columns as TAP_SCHEMA describes them, and the
registry's declarations it is made of (its SQL: :mod:`obsflow.catalog.obscore`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from obsflow.catalog.obscore import InstrumentFacts, ObsCoreFacts, ProductFacts
from obsflow.registry import Registry

__all__ = ["OBSCORE", "ColumnInfo", "TableInfo", "facts_of"]


@dataclass(frozen=True)
class ColumnInfo:
    """One column as TAP_SCHEMA.columns and VOTable FIELDs describe it."""

    name: str
    datatype: str
    """VOTable datatype: ``char``, ``int``, ``long``, ``double``."""
    description: str
    unit: str | None = None
    ucd: str | None = None
    utype: str | None = None
    xtype: str | None = None
    principal: bool = False
    indexed: bool = False
    std: bool = True

    @property
    def sql_name(self) -> str:
        """The name without ADQL's delimiters (TAP_SCHEMA's ``"size"`` is ``size``)."""
        return self.name.strip('"')

    @property
    def arraysize(self) -> str | None:
        return "*" if self.datatype == "char" else None


@dataclass(frozen=True)
class TableInfo:
    schema: str
    name: str
    """Qualified, as ADQL names it (``ivoa.obscore``)."""
    description: str
    columns: tuple[ColumnInfo, ...]
    utype: str | None = None


def _c(
    name: str,
    datatype: str,
    unit: str | None,
    ucd: str,
    utype: str,
    description: str,
    *,
    xtype: str | None = None,
    principal: bool = False,
    std: bool = True,
) -> ColumnInfo:
    return ColumnInfo(
        name, datatype, description, unit, ucd, "obscore:" + utype, xtype, principal, std=std
    )


OBSCORE: Final = TableInfo(
    schema="ivoa",
    name="ivoa.obscore",
    description="ObsCore 1.1: one row per dataset (frame or product) in the archive",
    utype="ivo://ivoa.net/std/ObsCore#core-1.1",
    columns=(
        _c("dataproduct_type", "char", None, "meta.code.class", "ObsDataset.dataProductType",
           "Data product type (image, cube, spectrum...)", principal=True),
        _c("calib_level", "int", None, "meta.code;obs.calib", "ObsDataset.calibLevel",
           "Calibration level: 1 raw, 2 calibrated, 3 reduced, 4 analysis", principal=True),
        _c("obs_collection", "char", None, "meta.id", "DataID.Collection",
           "Name of the data collection (the instrument)", principal=True),
        _c("obs_id", "char", None, "meta.id", "DataID.observationID",
           "Observation ID (the archive ID)", principal=True),
        _c("obs_publisher_did", "char", None, "meta.ref.ivoid", "Curation.publisherDID",
           "Dataset identifier given by the publisher", principal=True),
        _c("access_url", "char", None, "meta.ref.url", "Access.reference",
           "URL to download the data (or its DataLink document)", principal=True),
        _c("access_format", "char", None, "meta.code.mime", "Access.format",
           "Content format of the data"),
        _c("access_estsize", "long", "kbyte", "phys.size;meta.file", "Access.size",
           "Estimated size of the dataset"),
        _c("target_name", "char", None, "meta.id;src", "Target.name",
           "Object of interest (NULL until the data are released, but to their program)",
           principal=True),
        _c("s_ra", "double", "deg", "pos.eq.ra",
           "Char.SpatialAxis.Coverage.Location.Coord.Position2D.Value2.C1",
           "Central right ascension, ICRS", principal=True),
        _c("s_dec", "double", "deg", "pos.eq.dec",
           "Char.SpatialAxis.Coverage.Location.Coord.Position2D.Value2.C2",
           "Central declination, ICRS", principal=True),
        _c("s_fov", "double", "deg", "phys.angSize;instr.fov",
           "Char.SpatialAxis.Coverage.Bounds.Extent.diameter",
           "Diameter of the covered region"),
        _c("s_region", "char", None, "pos.outline;obs.field",
           "Char.SpatialAxis.Coverage.Support.Area",
           "Region covered, STC-S", xtype="adql:REGION"),
        _c("s_resolution", "double", "arcsec", "pos.angResolution",
           "Char.SpatialAxis.Resolution.Refval.value",
           "Spatial resolution of the data"),
        _c("s_xel1", "long", None, "meta.number", "Char.SpatialAxis.numBins1",
           "Number of elements along the first spatial axis"),
        _c("s_xel2", "long", None, "meta.number", "Char.SpatialAxis.numBins2",
           "Number of elements along the second spatial axis"),
        _c("t_min", "double", "d", "time.start;obs.exposure",
           "Char.TimeAxis.Coverage.Bounds.Limits.StartTime",
           "Start time, MJD", principal=True),
        _c("t_max", "double", "d", "time.end;obs.exposure",
           "Char.TimeAxis.Coverage.Bounds.Limits.StopTime",
           "Stop time, MJD", principal=True),
        _c("t_exptime", "double", "s", "time.duration;obs.exposure",
           "Char.TimeAxis.Coverage.Support.Extent",
           "Total exposure time"),
        _c("t_resolution", "double", "s", "time.resolution",
           "Char.TimeAxis.Resolution.Refval.value",
           "Temporal resolution"),
        _c("t_xel", "long", None, "meta.number", "Char.TimeAxis.numBins",
           "Number of elements along the time axis"),
        _c("em_min", "double", "m", "em.wl;stat.min",
           "Char.SpectralAxis.Coverage.Bounds.Limits.LoLimit",
           "Start of the spectral coverage (vacuum wavelength)", principal=True),
        _c("em_max", "double", "m", "em.wl;stat.max",
           "Char.SpectralAxis.Coverage.Bounds.Limits.HiLimit",
           "End of the spectral coverage (vacuum wavelength)", principal=True),
        _c("em_res_power", "double", None, "spect.resolution",
           "Char.SpectralAxis.Resolution.ResolPower.refVal",
           "Spectral resolving power"),
        _c("em_xel", "long", None, "meta.number", "Char.SpectralAxis.numBins",
           "Number of elements along the spectral axis"),
        _c("o_ucd", "char", None, "meta.ucd", "Char.ObservableAxis.ucd",
           "UCD of the observable"),
        _c("pol_states", "char", None, "meta.code;phys.polarization",
           "Char.PolarizationAxis.stateList",
           "Polarization states present"),
        _c("pol_xel", "long", None, "meta.number", "Char.PolarizationAxis.numBins",
           "Number of polarization samples"),
        _c("facility_name", "char", None, "meta.id;instr.tel", "Provenance.ObsConfig.Facility.name",
           "The telescope"),
        _c("instrument_name", "char", None, "meta.id;instr", "Provenance.ObsConfig.Instrument.name",
           "The instrument", principal=True),
        _c("proposal_id", "char", None, "meta.id; obs.proposal", "Provenance.Proposal.identifier",
           "The program the data were taken for"),
        _c("obs_release_date", "char", None, "time.release", "Curation.releaseDate",
           "When the data become public (NULL: they are)", xtype="timestamp"),
        _c("em_filter", "char", None, "meta.id;instr.filter", "Provenance.ObsConfig.filter",
           "The filter (obsflow)", std=False),
        _c("obs_type", "char", None, "meta.code;obs", "Provenance.ObsConfig.frameType",
           "The frame type: bias, flat, science... (obsflow)", std=False),
    ),
)  # fmt: skip


def facts_of(
    registry: Registry, authority: str, data_url: str, datalink_url: str | None = None
) -> ObsCoreFacts:
    """The registry's declarations as :class:`ObsCoreFacts` (wavelengths in metres)."""
    products = {
        p.id: ProductFacts(
            dataproduct_type=p.obscore.dataproduct_type.value,
            calib_level=(
                p.obscore.calib_level if p.obscore.calib_level is not None else min(p.level + 1, 4)
            ),
            o_ucd=p.obscore.o_ucd,
        )
        for p in registry.products.values()
    }
    instruments = {
        i.name: InstrumentFacts(
            facility=i.obscore.facility,
            fov_deg=i.obscore.fov_deg,
            resolution_arcsec=i.obscore.resolution_arcsec,
            pixels=i.obscore.pixels,
            wavelength_m={
                band: (low / 1e9, high / 1e9)
                for band, (low, high) in i.obscore.wavelength_nm.items()
            },
        )
        for i in registry.instruments.values()
    }
    return ObsCoreFacts(products, instruments, authority, data_url, datalink_url)
