"""Regenerate the seed files of the hostile-input corpus (tests/corpus/{dicom,png,datalist}/).

Run ``python tests/corpus/make_corpus.py`` from the repository root. Seeds are the cases of the reliability issue;
inputs found by the fuzzer (tests/test_fuzz.py) are added next to them as ``found-<sha1>.<ext>`` and never removed.
Datalists are stored gzipped (``<name>.json.gz``, mtime 0): their exact bytes (latin-1, UTF-16, no final newline)
would otherwise break the repository's text/JSON format checks (tests/test_zoo.py).
Every file here must load, or be refused with the bundle's own error naming the file (tests/test_fuzz.py replays
them all). Files stay tiny: a "bomb" is a header that declares a huge size, not a huge file.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from bundle.utils.dicom import make_dataset, phantom, write  # noqa: E402

UID = "1.2.826.0.1.3680043.8.498.1"  # fixed UIDs: reproducible bytes
DATALIST = {
    "name": "corpus",
    "classes": ["nodule_mass", "pleural_effusion", "edema"],
    "training": [
        {"image": "a.png", "label": [1, 0, None], "sex": "F", "age": 57, "patient_id": "p1"},
        {
            "image": "b.png",
            "label": [0, 1, 0],
            "sex": "M",
            "age": "045Y",
            "patient_id": "p2",
            "attention": [
                {"class": "pleural_effusion", "type": "bbox_xyxy", "coords": [1, 2, 30, 40], "frame": [64, 64]}
            ],
        },
    ],
    "validation": [{"image": "c.png", "label": [0, 0, 0], "sex": "F", "age": 33, "patient_id": "p3"}],
}


def _stored(h=32, w=32) -> np.ndarray:
    return (phantom(h, w) * 4095).astype(np.uint16)


def _ds(**kw):
    return make_dataset(_stored(), bits_stored=12, sop_instance_uid=UID, **kw)


def _resave(ds, path: str) -> None:
    """Save with the fixed UIDs (Dataset.compress draws a new SOP Instance UID): reproducible bytes."""
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID
    ds.save_as(path, enforce_file_format=True)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def dicoms(d: str) -> None:
    write(_ds(rescale=(float("nan"), 0.0)), os.path.join(d, "nan_rescale_slope.dcm"))
    write(_ds(window=(2048.0, float("inf"))), os.path.join(d, "inf_window_width.dcm"))
    ds = _ds(with_pixels=False)
    a = _stored().astype(np.float32)
    a.ravel()[:20] = np.nan
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    del ds.PixelRepresentation
    ds.FloatPixelData = a.tobytes()
    write(ds, os.path.join(d, "nan_pixels_float.dcm"))
    full = os.path.join(d, "_full.dcm")
    write(_ds(), full)
    with open(full, "rb") as f:
        data = f.read()
    os.remove(full)
    with open(os.path.join(d, "truncated_300_bytes.dcm"), "wb") as f:
        f.write(data[:300])
    # RLE bomb: a valid 32x32 RLE frame whose header declares 40000 x 40000 (and 65535 x 65535)
    from pydicom.uid import RLELossless

    for side in (40000, 65535):
        p = os.path.join(d, f"rle_bomb_{side}.dcm")
        write(_ds(), p, transfer_syntax=RLELossless)
        import pydicom

        ds = pydicom.dcmread(p)
        ds.Rows = ds.Columns = side
        _resave(ds, p)
    # found by the fuzzer: Rows edited to 1 on an RLE frame made pylibjpeg-rle panic (pyo3 PanicException, a
    # BaseException that ``except Exception`` let through)
    import pydicom

    p = os.path.join(d, "rle_rows_mismatch_decoder_panic.dcm")
    write(make_dataset(_stored(16, 12), bits_stored=12, sop_instance_uid=UID), p, transfer_syntax=RLELossless)
    ds = pydicom.dcmread(p)
    ds.Rows = 1
    _resave(ds, p)
    # a JPEG 2000 frame whose own SIZ declares 40000 x 40000 inside a DICOM whose Rows/Columns say 32 x 32
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEG2000Lossless

    p = os.path.join(d, "j2k_siz_bomb_in_small_dicom.dcm")
    write(_ds(), p, transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(p)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[8:16] = struct.pack(">II", 40000, 40000)
    ds.PixelData = encapsulate([bytes(frame)])
    _resave(ds, p)


def pngs(d: str) -> None:
    buf = io.BytesIO()
    Image.fromarray((phantom(16, 16) * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    data = buf.getvalue()
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 60000, 60000)
    bomb = data[:8] + _png_chunk(b"IHDR", bytes(ihdr)) + data[33:]
    with open(os.path.join(d, "ihdr_60000x60000.png"), "wb") as f:
        f.write(bomb)
    with open(os.path.join(d, "truncated_ihdr.png"), "wb") as f:
        f.write(data[:20])


def put_datalist(d: str, name: str, data: bytes) -> str:
    """Store a datalist's exact bytes as ``<d>/<name>.gz`` (reproducible: mtime 0)."""
    path = os.path.join(d, name + ".gz")
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g:
        g.write(data)
    return path


def datalists(d: str) -> None:
    text = json.dumps(DATALIST, ensure_ascii=False).replace('"corpus"', '"Hôpital Saint-Étienne"')
    put_datalist(d, "latin1.json", text.encode("latin-1"))
    put_datalist(d, "utf16.json", codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    put_datalist(d, "utf8_bom.json", codecs.BOM_UTF8 + text.encode("utf-8"))  # accepted: valid, with a BOM
    deep = '{"name": "deep", "classes": ["a"], "training": ' + "[" * 10000 + "]" * 10000 + "}"
    put_datalist(d, "deep_nesting.json", deep.encode())
    dl = json.loads(json.dumps(DATALIST))
    dl["training"][0]["image"] = "/dev/zero"
    put_datalist(d, "dev_zero_image.json", json.dumps(dl).encode())
    dl = json.loads(json.dumps(DATALIST))
    dl["training"][0]["image"] = "../../../../../../etc/passwd"
    put_datalist(d, "path_traversal.json", json.dumps(dl).encode())
    dl = json.loads(json.dumps(DATALIST))
    dl["training"][1]["attention"] = [
        {"class": "edema", "type": "rle", "coords": {"size": [60000, 60000], "counts": "0"}}  # 13.4 GiB if decoded
    ]
    put_datalist(d, "rle_bomb_attention.json", json.dumps(dl).encode())
    dl = json.loads(json.dumps(DATALIST))
    dl["test"] = [dict(dl["training"][0], patient_id="other-id")]
    put_datalist(d, "leakage_same_image.json", json.dumps(dl).encode())
    dl = json.loads(json.dumps(DATALIST))
    dl["training"] = []
    put_datalist(d, "empty_training.json", json.dumps(dl).encode())


if __name__ == "__main__":
    for kind, make in (("dicom", dicoms), ("png", pngs), ("datalist", datalists)):
        os.makedirs(os.path.join(HERE, kind), exist_ok=True)
        make(os.path.join(HERE, kind))
    print("corpus written to", HERE)
