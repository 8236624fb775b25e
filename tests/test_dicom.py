"""DICOM input (plabel.data.dicom through imageio.decode_image and ingest): DICOM files written here
with pydicom, whose expected pixels are computed by hand, and pydicom's own bundled test files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian

from plabel.data import dicom
from plabel.data.imageio import ImageDecodeError, decode_image, sniff_format, to_gray_float
from plabel.data.ingest import ingest, shard_paths
from plabel.data.samples import decode_gray
from plabel.data.shard_reader import read_shard_file

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
MPEG2 = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level: no decoder for it here
# stored values of a 9 x 12 (non-square) 12-bit image: this 3 x 4 block, tiled
BLOCK = np.array([[0, 1000, 750, 1500],
                  [4095, 0, 1000, 750],
                  [1500, 4095, 0, 1000]], dtype=np.uint16)
STORED = np.tile(BLOCK, (3, 3))


def write_dicom(path: Path, pixels: np.ndarray = STORED, photometric: str = "MONOCHROME2", sop: str = "1.2.826.0.1.3680043.8.498.1",
                frames: int = 1, **elements) -> Path:
    """A single- or multi-frame 16-bit DX file; ``elements`` are set on the dataset (RescaleSlope ...)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = DX, sop, "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.concatenate([pixels] * frames).astype("<u2").tobytes()
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


def decode(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes(), path.name)


def test_modality_lut_then_linear_window(tmp_path):
    # x = 2 v - 1000; LINEAR window c 1000, w 2001: y = clip((x - 999.5) / 2000 + 0.5, 0, 1); out = round(65535 y)
    out = decode(write_dicom(tmp_path / "a.dcm", RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000,
                             WindowWidth=2001))
    assert out.dtype == np.uint16 and out.shape == (9, 12)  # the image's own (non-square) grid
    v0, v750, v1000, v1500, v4095 = 0, 16400, 32784, 65535, 65535  # by hand: y = 0, 0.25025, 0.50025, 1, 1
    block = [[v0, v1000, v750, v1500], [v4095, v0, v1000, v750], [v1500, v4095, v0, v1000]]
    np.testing.assert_array_equal(out, np.tile(block, (3, 3)))


def test_monochrome1_is_inverted(tmp_path):
    out = decode(write_dicom(tmp_path / "m1.dcm", photometric="MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1000,
                             WindowCenter=1000, WindowWidth=2001))
    assert out[0, :4].tolist() == [65535, 32751, 49135, 0]  # round(65535 (1 - y)) for y = 0, 0.50025, 0.25025, 1


def test_without_window_the_image_range_is_used(tmp_path):
    out = decode(write_dicom(tmp_path / "plain.dcm"))
    assert out[0, :4].tolist() == [0, 16004, 12003, 24005]  # round(65535 v / 4095): 16003.66, 12002.75, 24005.49
    assert out.max() == 65535
    gray = to_gray_float(out)  # the one conversion to [0, 1] keeps the 16-bit steps
    assert gray[0, 1] == pytest.approx(16004 / 65535, abs=1e-6)


def test_linear_exact_and_sigmoid_windows(tmp_path):
    # LINEAR_EXACT c 1000, w 2000: y = clip((v - 1000) / 2000 + 0.5); v 750 -> 0.375, v 1500 -> 0.75, v 0 -> 0
    exact = decode(write_dicom(tmp_path / "e.dcm", WindowCenter=1000, WindowWidth=2000, VOILUTFunction="LINEAR_EXACT"))
    assert [exact[0, 2], exact[0, 3], exact[0, 0], exact[1, 0]] == [24576, 49151, 0, 65535]
    # SIGMOID: y = 1 / (1 + exp(-4 (v - c) / w)); v 1500 -> 1 / (1 + e^-1)
    sig = decode(write_dicom(tmp_path / "s.dcm", WindowCenter=1000, WindowWidth=2000, VOILUTFunction="SIGMOID"))
    assert sig[0, 3] == round(65535 / (1 + math.exp(-1))) and sig[0, 0] == round(65535 / (1 + math.exp(2)))


def test_compressed_syntaxes_decode_to_the_same_pixels():
    """pydicom's bundled MR_small in four transfer syntaxes (native, RLE, JPEG 2000 lossless,
    JPEG-LS lossless) gives one and the same image."""
    names = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
    images = [decode(Path(get_testdata_file(n))) for n in names]
    assert images[0].shape == (64, 64) and images[0].dtype == np.uint16
    for n, im in zip(names[1:], images[1:]):
        np.testing.assert_array_equal(im, images[0], err_msg=n)


def test_colour_dicom_is_rgb():
    rgb = decode(Path(get_testdata_file("SC_rgb_rle.dcm")))
    ref = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")).pixel_array
    assert rgb.shape == (100, 100, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, ref)


def test_refusals_name_the_reason(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"'multi\.dcm'.*multi-frame DICOM \(3 frames\)"):
        decode(write_dicom(tmp_path / "multi.dcm", frames=3))
    with pytest.raises(ImageDecodeError, match="no image in this DICOM file"):
        decode(Path(get_testdata_file("rtplan.dcm")))
    # a transfer syntax without a decoder here: its name is in the message
    path = write_dicom(tmp_path / "mpeg2.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = UID(MPEG2)
    ds.PixelData = encapsulate([b"\xff\x0a not a codestream"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageDecodeError, match=f"transfer syntax MPEG2 Main Profile.*{MPEG2}"):
        decode(path)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(write_dicom(tmp_path / "whole.dcm").read_bytes()[:200])
    with pytest.raises(ImageDecodeError, match="cut.dcm"):
        decode(cut)


def test_sniffed_by_the_dicm_magic(tmp_path):
    data = write_dicom(tmp_path / "x.dcm").read_bytes()
    assert sniff_format(data) == "dicom" and data[128:132] == b"DICM"
    assert dicom.header(data).sop_instance_uid == "1.2.826.0.1.3680043.8.498.1"


def test_ingest_reads_dicom_and_keeps_the_sop_instance_uid(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for k in range(3):
        write_dicom(src / "images" / f"case{k}.dcm", STORED + k, sop=f"1.2.826.0.1.3680043.8.498.{k + 10}",
                    RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=2001)
    manifest = ingest(src, tmp_path / "shards", counts={}, seed=0)
    assert sorted(manifest["splits"]["unlabelled"]["ids"]) == ["case0", "case1", "case2"]  # ids from file names
    samples = list(read_shard_file(shard_paths(tmp_path / "shards", "unlabelled")[0]))
    seen = {}
    for sample in samples:
        meta = json.loads(bytes(sample["json"]))
        seen[meta["id"]] = meta["sop_instance_uid"]
        assert (meta["height"], meta["width"], meta["modality"]) == (9, 12, "DX")
        k = int(meta["id"][-1])
        expected = decode_image((src / "images" / f"case{k}.dcm").read_bytes(), "x")
        np.testing.assert_array_equal(decode_gray(sample), np.round(to_gray_float(expected) * 255).astype(np.uint8))
    assert seen == {f"case{k}": f"1.2.826.0.1.3680043.8.498.{k + 10}" for k in range(3)}
