"""``--format dicom-seg``: one DICOM Segmentation object per DICOM source image (for PACS / viewers).

    OUT/<id>.seg.dcm                BINARY SEG (highdicom), one segment per class with pixels
    OUT/index.json                  per image: source SOPInstanceUID, SEG SOPInstanceUID, segments

Each SEG references its source image (the original DICOM bytes stored in the shard: patient, study,
frame of reference and the referenced SOP instance are taken from it) and lies in the source's study
as a new series. Segments: one per exported class known on the image with at least one pixel,
labelled with the class name; the property category is SNOMED CT "Anatomical structure", the
property type a code of the private scheme ``99PLABEL`` whose meaning is the class name (plabel's
classes are user-defined). Overlapping classes are separate segments (BINARY allows overlap).
Unknown classes (dropped by the gate or left out by the selection) are not written; images from
non-DICOM sources are skipped (a SEG must reference a DICOM image).

The SEG copies PatientOrientation from the source (DX/CR images carry it, SEG's multi-frame
functional groups need it) and sets SliceThickness in the pixel measures to the source's value or 1
mm for projection images, which have none (dciodvfy otherwise flags both).
"""
from __future__ import annotations

import io
import json

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from plabel.data import storage
from plabel.data.export.select import ExportRow

NAME = "dicom-seg"
SCHEME = "99PLABEL"


def _descriptions(names: list[str], version: str) -> list:
    algorithm = hd.AlgorithmIdentificationSequence(name="plabel", version=version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    return [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=c,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept(value=f"PL{i + 1:03d}", scheme_designator=SCHEME, meaning=c[:64]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for i, c in enumerate(names)]


def segmentation(source: pydicom.Dataset, masks: dict[str, np.ndarray], version: str):
    """A highdicom Segmentation of one source image: masks {class: bool (H, W)} (non-empty)."""
    names = list(masks)
    pixel_array = np.stack([masks[c] for c in names], axis=-1)[None].astype(bool)  # (1, H, W, S)
    spacing = [float(v) for v in getattr(source, "PixelSpacing", None) or
               getattr(source, "ImagerPixelSpacing", None) or [1.0, 1.0]]
    thickness = float(getattr(source, "SliceThickness", None) or 1.0)
    measures = hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=thickness)
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=pixel_array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(names, version), series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="plabel", manufacturer_model_name="plabel",
        software_versions=version, device_serial_number="0", content_label="PLABEL",
        content_description="plabel pseudo labels"[:64], pixel_measures=measures, omit_empty_frames=True)
    if "PatientOrientation" in source:
        seg.PatientOrientation = source.PatientOrientation
    return seg


def write_row(er: ExportRow, ext: str, data: bytes, out: str, plan: dict) -> dict:
    """Write <id>.seg.dcm for a DICOM source; other sources are skipped."""
    if ext != "dcm":
        return {"id": er.id, "skipped": "source is not DICOM"}
    masks = {c: lab.mask for c, lab in er.labels.items() if lab.state != "unknown" and lab.mask.any()}
    if not masks:
        return {"id": er.id, "skipped": "no exported class has a pixel"}
    source = pydicom.dcmread(io.BytesIO(data))
    if er.sop_instance_uid is not None and str(source.SOPInstanceUID) != er.sop_instance_uid:
        return {"id": er.id, "skipped": f"the shard's source is SOPInstanceUID {source.SOPInstanceUID}, the table's "
                                        f"{er.sop_instance_uid} (the shard changed after labelling)"}
    if (source.Rows, source.Columns) != (er.height, er.width):
        return {"id": er.id, "skipped": f"source is {source.Rows}x{source.Columns}, the masks {er.height}x{er.width}"}
    try:
        seg = segmentation(source, masks, plan.get("version", "unknown"))
    except (AttributeError, ValueError, TypeError) as e:  # a source highdicom cannot reference
        return {"id": er.id, "skipped": f"highdicom: {type(e).__name__}: {e}"}
    buf = io.BytesIO()
    seg.save_as(buf)
    storage.write_bytes(storage.join(out, f"{er.id}.seg.dcm"), buf.getvalue())
    return {"id": er.id, "images": 1, "masks": len(masks), "file": f"{er.id}.seg.dcm",
            "source_sop_instance_uid": str(source.SOPInstanceUID), "sop_instance_uid": str(seg.SOPInstanceUID),
            "segments": list(masks)}


def finish(out: str, records: list[dict], classes: list[str], plan: dict, meta: dict) -> dict:
    """index.json: per written SEG its file, source and segments."""
    index = [{k: r[k] for k in ("id", "file", "source_sop_instance_uid", "sop_instance_uid", "segments")}
             for r in sorted(records, key=lambda r: r["id"]) if "file" in r]
    storage.write_text(storage.join(out, "index.json"), json.dumps(index, indent=1) + "\n")
    return {"index": "index.json"}
