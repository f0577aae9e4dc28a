"""Fuzzing of the hostile-input surface with a kept corpus (tests/corpus/, docs/image_pipeline.md "Fuzzing").

The only allowed outcomes:
  * ``load_cxr``: a float32 (H, W) image, finite, in [0, 1]; or a :class:`CXRLoadError` whose message names the file;
  * ``datalist.load``: a dict; or a :class:`DatalistError` whose message names the file;
  * ``datalist.validate``: a list of :class:`Problem` (it never raises);
  * ``rasterize_attention``: masks in {0, 1}; or an :class:`AttentionError` naming the record.
Never a hang (each example runs under a SIGALRM deadline) and never a foreign exception (UnicodeDecodeError,
struct.error, IndexError, MemoryError, RecursionError, ...).

``test_corpus_*`` replays every kept file (fast: it only reads the corpus). The hypothesis tests run a small,
derandomized number of examples in CI; for a real fuzzing session::

    FUZZ_EXAMPLES=5000 FUZZ_RANDOM=1 python -m pytest tests/test_fuzz.py -k fuzz

Every input that breaks a property is written to tests/corpus/<kind>/found-<sha1>.<ext> before the test fails:
commit it with the fix, so the replay keeps it fixed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from bundle.data import datalist as dl
from bundle.transforms import AttentionError, CXRLoadError, load_cxr
from bundle.transforms.attention import rasterize_attention
from bundle.utils.dicom import make_dataset, phantom, write

CORPUS = Path(__file__).parent / "corpus"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
PER_EXAMPLE_S = int(os.environ.get("FUZZ_DEADLINE_S", "20"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=not os.environ.get("FUZZ_RANDOM"),
    deadline=None,  # wall-clock deadlines are flaky on 2 shared cores; hangs are caught by _deadline instead
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
CLASSES = ["nodule_mass", "pleural_effusion", "edema"]


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: int = PER_EXAMPLE_S):
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def _alarm(signum, frame):
        raise _Hang(f"example ran over {seconds} s (hang?)")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _final_example() -> bool:
    """True for the example hypothesis reports (the shrunk one), so shrinking does not flood the corpus."""
    try:
        from hypothesis.control import current_build_context

        return current_build_context().is_final
    except Exception:  # noqa: BLE001  (outside hypothesis: always keep)
        return True


def _keep(kind: str, data: bytes, ext: str) -> Path | None:
    """Write a failing input into the corpus (idempotent: named by its hash)."""
    if not _final_example():
        return None
    d = CORPUS / kind
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"found-{hashlib.sha1(data).hexdigest()[:16]}{ext}"
    if kind == "datalist":  # exact bytes, gzipped: the repository's JSON/text checks skip .gz (tests/test_zoo.py)
        p = p.with_name(p.name + ".gz")
        if not p.exists():
            p.write_bytes(gzip.compress(data, mtime=0))
    elif not p.exists():
        p.write_bytes(data)
    return p


# ------------------------------------------------------------------------------------------- properties
def check_image_file(path) -> None:
    """The loader property on one file."""
    path = str(path)
    try:
        with _deadline():
            img = load_cxr(path)
    except CXRLoadError as e:
        assert path in str(e), f"CXRLoadError does not name the file: {e}"
        return
    assert isinstance(img, np.ndarray) and img.dtype == np.float32 and img.ndim == 2, (type(img), img.dtype)
    assert np.isfinite(img).all(), f"{path}: non-finite pixels loaded without error"
    assert img.min() >= 0.0 and img.max() <= 1.0, (img.min(), img.max())


def check_datalist_file(path, **kw) -> None:
    """The datalist property on one file (load validates; DatalistError is the only allowed error)."""
    path = os.path.abspath(str(path))
    try:
        with _deadline():
            out = dl.load(path, **kw)
    except dl.DatalistError as e:
        assert path in str(e), f"DatalistError does not name the file: {e}"
        return
    assert isinstance(out, dict)


def check_validate(obj, **kw) -> list:
    with _deadline():
        problems = dl.validate(obj, **kw)
    assert isinstance(problems, list) and all(isinstance(p, dl.Problem) for p in problems)
    for p in problems:
        assert str(p) and p.severity in ("error", "warning")
    return problems


def _guard(kind: str, data: bytes, ext: str, fn) -> None:
    """Run ``fn``; keep ``data`` in the corpus when it breaks the property (any exception, including a hang)."""
    try:
        fn()
    except BaseException as e:  # noqa: B036  (the corpus must keep every failing input, whatever it raised)
        if isinstance(e, KeyboardInterrupt):
            raise
        kept = _keep(kind, data, ext)
        raise AssertionError(f"property broken ({type(e).__name__}: {e}); input kept as {kept}") from e


# ------------------------------------------------------------------------------------------- corpus replay
def _corpus(kind: str) -> list[Path]:
    return sorted(p for p in (CORPUS / kind).glob("*") if p.is_file() and not p.name.startswith("."))


@pytest.mark.parametrize("path", _corpus("dicom") + _corpus("png"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_images(path):
    check_image_file(path)


@pytest.mark.parametrize("gz", _corpus("datalist"), ids=lambda p: p.name)
def test_corpus_datalists(gz, tmp_path):
    path = tmp_path / gz.name[: -len(".gz")]  # the exact bytes, under their .json name, next to nothing else
    path.write_bytes(gzip.decompress(gz.read_bytes()))
    check_datalist_file(path)
    check_datalist_file(path, check_images=True, strict=False, data_root=str(tmp_path))
    check_datalist_file(path, required_splits=["training", "validation"], strict=False)
    try:
        obj = dl.loads_bytes(path.read_bytes(), str(path))
    except dl.DatalistError:
        return
    check_validate(obj, base_dir=str(path.parent), check_images=True)
    _rasterize_all(obj)


def test_corpus_seeds_present():
    names = {p.name for p in _corpus("dicom") + _corpus("png") + _corpus("datalist")}
    for seed in (
        "nan_pixels_float.dcm",
        "nan_rescale_slope.dcm",
        "rle_bomb_40000.dcm",
        "truncated_300_bytes.dcm",
        "ihdr_60000x60000.png",
        "latin1.json.gz",
        "utf16.json.gz",
        "deep_nesting.json.gz",
    ):
        assert seed in names, seed
    assert all(p.stat().st_size < 64 * 1024 for p in _corpus("dicom") + _corpus("png") + _corpus("datalist"))


# ------------------------------------------------------------------------------------------- seeds for the fuzz
def _seed_images() -> dict[str, bytes]:
    out = {}
    stored = (phantom(24, 20) * 4095).astype(np.uint16)
    stored32 = (phantom(32, 32) * 4095).astype(np.uint16)  # OpenJPEG's default 6 levels need >= 32 px
    tmp = io.BytesIO()
    for name, ds, ts in (
        ("plain.dcm", make_dataset(stored, bits_stored=12, window=(2048.0, 4096.0), sop_instance_uid="1.2.3"), None),
        ("rle.dcm", make_dataset(stored, bits_stored=12, rescale=(2.0, -10.0), sop_instance_uid="1.2.4"), RLELossless),
        (
            "mono1_voi.dcm",
            make_dataset(
                stored,
                bits_stored=12,
                photometric="MONOCHROME1",
                voi_lut=(0, 8, list(range(0, 256)) * 16),
                sop_instance_uid="1.2.5",
            ),
            None,
        ),
        ("raw.dcm", make_dataset(stored.astype(np.int16), sop_instance_uid="1.2.6"), "raw"),
        ("j2k.dcm", make_dataset(stored32, bits_stored=12, sop_instance_uid="1.2.8"), JPEG2000Lossless),
        ("jpegls.dcm", make_dataset(stored32, bits_stored=12, sop_instance_uid="1.2.9"), JPEGLSLossless),
    ):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, name)
            if ts == "raw":
                write(ds, p, preamble=False)
            else:
                write(ds, p, transfer_syntax=ts)
            out[name] = open(p, "rb").read()
    grey = (phantom(20, 16) * 255).astype(np.uint8)
    for name, im, fmt in (
        ("grey.png", Image.fromarray(grey, mode="L"), "PNG"),
        ("grey16.png", Image.fromarray((phantom(20, 16) * 65535).astype(np.uint16)), "PNG"),
        ("rgba.png", Image.fromarray(np.dstack([grey] * 4), mode="RGBA"), "PNG"),
        ("grey.jpg", Image.fromarray(grey, mode="L"), "JPEG"),
    ):
        tmp = io.BytesIO()
        im.save(tmp, format=fmt)
        out[name] = tmp.getvalue()
    return out


SEEDS = _seed_images()


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """Byte-level mutations biased to the header (where the parser's trust lives)."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        if not b:
            break
        head = min(len(b) - 1, 400)
        pos = draw(st.one_of(st.integers(0, head), st.integers(0, len(b) - 1)))
        op = draw(st.sampled_from(["set", "set", "flip", "insert", "delete", "truncate", "u16", "u32"]))
        if op == "set":
            b[pos] = draw(st.integers(0, 255))
        elif op == "flip":
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del b[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del b[pos:]
        else:  # plant an extreme integer (a size, a length, a count)
            n = 2 if op == "u16" else 4
            v = draw(st.sampled_from([0, 1, 2 ** (8 * n - 1) - 1, 2 ** (8 * n) - 1, 2 ** (8 * n - 1), 40000]))
            b[pos : pos + n] = v.to_bytes(n, draw(st.sampled_from(["little", "big"])))
    return bytes(b)


@FUZZ
@given(st.sampled_from(sorted(SEEDS)).flatmap(lambda name: st.tuples(st.just(name), mutated(SEEDS[name]))))
def test_fuzz_loader_mutated_bytes(tmp_path_factory, case):
    name, data = case
    p = tmp_path_factory.mktemp("fz") / name
    p.write_bytes(data)
    _guard("dicom" if name.endswith(".dcm") else "png", data, os.path.splitext(name)[1], lambda: check_image_file(p))


_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0, 1e308, 1e-308]))
_HEADER = {
    "Rows": st.one_of(st.integers(0, 64), st.sampled_from([40000, 65535, 16384])),
    "Columns": st.one_of(st.integers(0, 64), st.sampled_from([40000, 65535, 16384])),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32, 64]),
    "BitsStored": st.integers(0, 40),
    "HighBit": st.integers(0, 40),
    "PixelRepresentation": st.integers(0, 2),
    "SamplesPerPixel": st.integers(0, 4),
    "NumberOfFrames": st.one_of(st.integers(0, 4), st.sampled_from(["x", "", "1e9"])),
    "PhotometricInterpretation": st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", ""]
    ),
    "RescaleSlope": _FLOATS,
    "RescaleIntercept": _FLOATS,
    "WindowCenter": _FLOATS,
    "WindowWidth": _FLOATS,
    "Modality": st.sampled_from(["DX", "CR", "OT", "", "CT"]),
    "PresentationLUTShape": st.sampled_from(["IDENTITY", "INVERSE", "X"]),
}


@FUZZ
@given(
    header=st.fixed_dictionaries({}, optional=_HEADER),
    compressed=st.booleans(),
)
def test_fuzz_loader_dicom_header(tmp_path_factory, header, compressed):
    """Hostile header values on a valid pixel stream (plain or RLE)."""
    stored = (phantom(16, 12) * 4095).astype(np.uint16)
    p = tmp_path_factory.mktemp("fh") / "h.dcm"
    try:
        base = make_dataset(stored, bits_stored=12, sop_instance_uid="1.2.7")
        write(base, p, transfer_syntax=RLELossless if compressed else None)
        import pydicom

        ds = pydicom.dcmread(p)
        for k, v in header.items():
            setattr(ds, k, v)
        ds.save_as(p, enforce_file_format=True)
    except Exception:  # noqa: BLE001  (pydicom refuses to write some values: not an input we can test)
        return
    data = p.read_bytes()
    _guard("dicom", data, ".dcm", lambda: check_image_file(p))


# ------------------------------------------------------------------------------------------- datalist fuzz
_KEYS = [
    "name",
    "classes",
    "training",
    "validation",
    "test",
    "image",
    "label",
    "attention",
    "sex",
    "age",
    "patient_id",
    "class",
    "type",
    "coords",
    "frame",
    "normalized",
    "path",
    "size",
    "counts",
]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["/dev/zero", "../../etc/passwd", "a.png", "045Y", "F", "rle", "mask", "polygon", "0", ""]),
)
JSONISH = st.recursive(
    _SCALARS,
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), ch, max_size=5),
    max_leaves=25,
)
_ATT = st.fixed_dictionaries(
    {
        "class": st.one_of(st.sampled_from(CLASSES), JSONISH),
        "type": st.one_of(st.sampled_from(sorted(dl.ATTENTION_TYPES)), JSONISH),
    },
    optional={
        "coords": st.one_of(
            JSONISH,
            st.lists(_FLOATS, min_size=3, max_size=4),
            st.lists(st.lists(_FLOATS, min_size=2, max_size=2), max_size=5),
            st.fixed_dictionaries(
                {
                    "size": st.lists(st.integers(-2, 70000), min_size=0, max_size=3),
                    "counts": st.one_of(JSONISH, st.text()),
                }
            ),
        ),
        "frame": st.one_of(JSONISH, st.lists(_FLOATS, min_size=2, max_size=2)),
        "normalized": JSONISH,
        "path": JSONISH,
    },
)
_RECORD = st.fixed_dictionaries(
    {},
    optional={
        "image": st.one_of(JSONISH, st.sampled_from(["a.png", "/dev/zero", "../a.png", "sub/../a.png"])),
        "label": st.one_of(JSONISH, st.lists(st.sampled_from([0, 1, -1, None, 0.5, True]), max_size=4)),
        "attention": st.one_of(JSONISH, st.lists(_ATT, max_size=3)),
        "sex": JSONISH,
        "age": JSONISH,
        "patient_id": JSONISH,
    },
)
DATALISTS = st.one_of(
    JSONISH,
    st.fixed_dictionaries(
        {"classes": st.one_of(st.just(CLASSES), JSONISH)},
        optional={
            "name": JSONISH,
            "training": st.lists(st.one_of(_RECORD, JSONISH), max_size=4),
            "validation": st.lists(_RECORD, max_size=3),
            "test": st.one_of(st.lists(_RECORD, max_size=2), JSONISH),
        },
    ),
)


def _rasterize_all(obj) -> None:
    if not isinstance(obj, dict):
        return
    for split in dl.split_names(obj):
        for i, rec in enumerate(obj[split]):
            if not isinstance(rec, dict) or not isinstance(rec.get("attention"), list):
                continue
            try:
                with _deadline():
                    m, a = rasterize_attention(rec["attention"], CLASSES, (40, 30), size=16, source=f"{split}[{i}]")
            except AttentionError as e:
                assert f"{split}[{i}]" in str(e)
                continue
            assert m.shape == (3, 16, 16) and set(np.unique(m)) <= {0.0, 1.0}


def _dump(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode("utf-8")


@FUZZ
@given(obj=DATALISTS, check_images=st.booleans(), root=st.booleans(), req=st.sampled_from([(), ("training",)]))
def test_fuzz_validate_structures(tmp_path_factory, obj, check_images, root, req):
    d = tmp_path_factory.mktemp("dl")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "a.png")

    def run():
        check_validate(
            obj, base_dir=str(d), check_images=check_images, data_root=str(d) if root else None, required_splits=req
        )
        _rasterize_all(obj)

    _guard("datalist", _dump(obj), ".json", run)


_REAL = json.dumps(
    {
        "name": "real",
        "classes": CLASSES,
        "training": [
            {
                "image": "a.png",
                "label": [1, 0, None],
                "sex": "F",
                "age": 57,
                "patient_id": "p1",
                "attention": [
                    {"class": "nodule_mass", "type": "bbox_xyxy", "coords": [1, 2, 5, 6], "frame": [8, 8]},
                    {"class": "nodule_mass", "type": "rle", "coords": {"size": [4, 4], "counts": "52203"}},
                ],
            },
            {"image": "b.png", "label": [0, 1, 0], "sex": "M", "age": "045Y", "patient_id": "p2"},
        ],
        "validation": [{"image": "a.png", "label": [0, 0, 0], "sex": "F", "age": 33, "patient_id": "p3"}],
    },
    ensure_ascii=False,
).encode("utf-8")


@FUZZ
@given(data=st.one_of(mutated(_REAL), st.binary(max_size=64), st.just(b"\xef\xbb\xbf" + _REAL)))
def test_fuzz_load_mutated_datalists(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("dlm")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "a.png")
    p = d / "datalist.json"
    p.write_bytes(data)

    def run():
        check_datalist_file(p, strict=False)
        check_datalist_file(p, check_images=True, data_root=str(d))

    _guard("datalist", data, ".json", run)


def test_real_seed_is_valid(tmp_path):
    obj = json.loads(_REAL)
    assert sum(dl.coco_rle_counts("52203")) == 16
    assert not [p for p in dl.validate(obj) if p.severity == "error" and p.code != "patient_leakage"]
    assert math.isfinite(len(SEEDS))
