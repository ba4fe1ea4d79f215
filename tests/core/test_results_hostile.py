"""A generated hostile corpus of results.h5 files (issue 15, items 2, 6 and 11).

Each case starts from a valid file written by :func:`write_results` and breaks one thing with
h5py (nothing binary is committed). Every case must end in a one-line
:class:`ResultsFileError` from both :func:`read_results` and :func:`results_summary` (where the
summary reads the broken part), within bounded memory (tracemalloc peak < 200 MB, peak RSS
growth < 1 GB) and < 10 s.
"""
from __future__ import annotations

import json
import resource
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

from cxrviewer.core.errors import CxrError
from cxrviewer.core.geometry import Box
from cxrviewer.core.io.results import (MAX_JSON_BYTES, ResultsFileError, read_results, resolve_source,
                                       results_summary, write_results)
from cxrviewer.core.results import Results

CLASSES = ("Atelectasis", "Nodule")


def _valid(path: Path, source: str = "/nonexistent/chest.png") -> Path:
    rng = np.random.default_rng(0)
    r = Results(study_id="s1", source_path=source, pixel_sha256="ab" * 32, image_shape=(64, 64),
                map_shape=(8, 8), classes=CLASSES, probabilities=np.asarray([0.2, 0.7], np.float32),
                maps={"cam": {"cam": rng.random((2, 8, 8), dtype=np.float32)},
                      "attention_mining": {"final": rng.random((2, 8, 8), dtype=np.float32),
                                           "steps": {"Nodule": rng.random((3, 8, 8), dtype=np.float32)}}},
                attrs={"cam": {"classes": list(CLASSES)}},
                boxes={"cam": [Box("Nodule", 1.0, 2.0, 3.0, 4.0, 0.5)]}, timings={"classify": 0.1})
    return write_results(r, path)


def _attr(name: str, value) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f.attrs[name] = value
    return edit


def _replace(name: str, **kw) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f[name]
        f.create_dataset(name, **kw)
    return edit


def _soft_loop(f: h5py.File) -> None:
    f["explainers/cam/loop"] = h5py.SoftLink("/explainers/cam/loop")


def _external(f: h5py.File) -> None:
    f["explainers/cam/ext"] = h5py.ExternalLink("/etc/passwd", "/x")


def _hard_cycle(f: h5py.File) -> None:
    f["explainers/cam/up"] = f["explainers"]


def _null(f: h5py.File) -> None:
    f["explainers/cam/empty"] = h5py.Empty("f4")


def _external_storage(f: h5py.File) -> None:
    f.create_dataset("explainers/cam/raw", shape=(8, 8), dtype="u1", external=[("/etc/hostname", 0, 64)])


def _virtual(f: h5py.File) -> None:
    layout = h5py.VirtualLayout(shape=(2, 8, 8), dtype="f4")
    layout[:] = h5py.VirtualSource("/nonexistent/other.h5", "cam", shape=(2, 8, 8))
    f.create_virtual_dataset("explainers/cam/virtual", layout)


def _deflate_bomb(f: h5py.File) -> None:
    """A chunk declared as 8 KiB whose stored deflate stream inflates to 256 MiB."""
    del f["explainers/cam/cam"]
    ds = f.create_dataset("explainers/cam/cam", shape=(2, 8, 8), dtype="f4", chunks=(2, 8, 8), compression="gzip")
    ds.id.write_direct_chunk((0, 0, 0), zlib.compress(bytes(256 * 2**20), 9))


def _deflate_corrupt(f: h5py.File) -> None:
    del f["explainers/cam/cam"]
    ds = f.create_dataset("explainers/cam/cam", shape=(2, 8, 8), dtype="f4", chunks=(2, 8, 8), compression="gzip")
    ds.id.write_direct_chunk((0, 0, 0), b"not a deflate stream")


def _filter_order(f: h5py.File) -> None:
    """Shuffle after deflate: the stored bytes are not a deflate stream HDF5's check could see."""
    del f["explainers/cam/cam"]
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((2, 8, 8))
    dcpl.set_deflate(4)
    dcpl.set_shuffle()
    h5py.h5d.create(f["explainers/cam"].id, b"cam", h5py.h5t.IEEE_F32LE, h5py.h5s.create_simple((2, 8, 8)), dcpl=dcpl)


def _lzf_bomb(f: h5py.File) -> None:
    """A chunk declared as 512 bytes whose LZF stream (one literal, then 264-byte back
    references) decodes to 26 MB; h5py's filter would grow its buffer step by step (tens of s)."""
    del f["explainers/cam/cam"]
    ds = f.create_dataset("explainers/cam/cam", shape=(2, 8, 8), dtype="f4", chunks=(2, 8, 8), compression="lzf")
    ds.id.write_direct_chunk((0, 0, 0), b"\x00A" + b"\xe0\xff\x00" * 100_000)


def _many_chunks(f: h5py.File) -> None:
    """Declared, not written: 2 M one-byte chunks (slow to walk, though nothing is stored)."""
    f.create_dataset("explainers/cam/extra", shape=(2, 1024, 1024), dtype="u1", chunks=(1, 1, 1))


def _scaleoffset(f: h5py.File) -> None:
    del f["explainers/cam/cam"]
    f.create_dataset("explainers/cam/cam", data=np.zeros((2, 8, 8), "i4"), scaleoffset=0)


def _too_many_members(f: h5py.File) -> None:
    g = f.create_group("explainers/many")
    for i in range(300):
        g.create_group(str(i))


def _vlen_label_huge(f: h5py.File) -> None:
    del f["boxes/cam/label"]
    f["boxes/cam"].create_dataset("label", data=["x" * 100_000], dtype=h5py.string_dtype())


_RECIPE = {"map_shape": [8, 8], "frame_shape": [64, 64], "box": None, "theta_inv": None, "mode": "bilinear"}


def _encoded(encoding: str, data: np.ndarray, **attrs) -> Callable[[h5py.File], None]:
    """``explainers/cam/cam`` replaced by a version 3 encoded dataset (``recipe``: a dict -> JSON)."""
    def edit(f: h5py.File) -> None:
        del f["explainers/cam/cam"]
        ds = f.create_dataset("explainers/cam/cam", data=data)
        ds.attrs["encoding"] = encoding
        for k, v in attrs.items():
            ds.attrs[k] = json.dumps(v) if isinstance(v, dict) else v
    return edit


def _native(data: np.ndarray | None = None, **recipe) -> Callable[[h5py.File], None]:
    return _encoded("native", np.zeros((2, 4, 4), "f4") if data is None else data, recipe={**_RECIPE, **recipe})


def _native_decode_bomb(f: h5py.File) -> None:
    """64 x 2 x 2 native values declared to decode at 4096 x 4096: 1 Gi elements."""
    del f["explainers/attention_mining"]
    f.attrs["map_shape"] = np.asarray([4096, 4096])
    _native(np.zeros((64, 2, 2), "f4"), map_shape=[4096, 4096])(f)


_Q = np.zeros((2, 8, 8), "u2")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_hdf5(path: Path) -> None:
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100 + b"garbage" * 1000)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


#: name -> (edit of the open file, or of the path), the message expected
CASES: dict[str, tuple[Callable, str]] = {
    "bad_json": (_attr("classes", "[not json"), "not valid JSON"),
    "nan_json_token": (_attr("timings", '{"a": NaN}'), "not valid JSON"),
    "json_float_overflow": (_attr("timings", '{"a": 1e999}'), "not valid JSON"),
    "json_huge_int": (_attr("models", '{"a": {"n": ' + "9" * 10_000 + "}}"), "not valid JSON"),
    "class_name_control": (_attr("classes", json.dumps(["Nod\u202eule", "x"])), "control characters"),
    "deep_json": (_attr("models", "[" * 100_000), "not valid JSON"),
    "json_list_for_dict": (_attr("models", "[1, 2]"), "not a dict"),
    "json_dict_for_list": (_attr("classes", '{"a": 1}'), "not a list"),
    "classes_not_names": (_attr("classes", "[1, 2]"), "classes"),
    "attr_int_for_json": (_attr("classes", 7), "not a text string"),
    "attr_array_for_json": (_attr("notices", np.zeros(5)), "not a text string"),
    "json_too_large": (_attr("notices", json.dumps(["x" * MAX_JSON_BYTES])), "bytes"),
    "explainer_attrs_list": (lambda f: f["explainers/cam"].attrs.__setitem__("attrs", "[]"), "not a dict"),
    "missing_study_id": (lambda f: f.attrs.__delitem__("study_id"), "'study_id' is missing"),
    "missing_group": (lambda f: f.__delitem__("boxes"), "lacks group"),
    "v1_without_its_groups": (_attr("format_version", 1), "lacks group"),
    "v1_group_is_dataset": (lambda f: (f.attrs.__setitem__("format_version", 1),
                                       [f.create_group(g) for g in ("cam", "attention_mining", "contrast",
                                                                    "disease_mask", "alignment")],
                                       f.__setitem__("segmentation", np.zeros(3))), "not a Group"),
    "version_is_text": (_attr("format_version", "2"), "format_version"),
    "shape_negative": (_attr("image_shape", np.asarray([-5, 64])), "out of range"),
    "shape_too_many_pixels": (_attr("image_shape", np.asarray([60000, 60000])), "out of range"),
    "shape_zero": (_attr("map_shape", np.asarray([0, 8])), "out of range"),
    "shape_wrong_length": (_attr("map_shape", np.asarray([8, 8, 8])), "2 integers"),
    "shape_float": (_attr("image_shape", np.asarray([64.0, 64.0])), "2 integers"),
    "soft_link_loop": (_soft_loop, "SoftLink"),
    "external_link": (_external, "ExternalLink"),
    "hard_link_cycle": (_hard_cycle, "not a Dataset"),
    "huge_declared_cam": (_replace("explainers/cam/cam", shape=(14, 8000, 8000), dtype="f4"), "larger than"),
    "huge_leading_axis": (_replace("explainers/cam/cam", shape=(100_000, 8, 8), dtype="f4"), "leading axis"),
    "over_element_budget": (lambda f: f.create_dataset("explainers/cam/extra", shape=(14, 4096, 4096), dtype="f4"),
                            "budget"),
    "budget_by_hard_links": (lambda f: [f.create_dataset(f"explainers/cam/x{i}", shape=(40, 1024, 1024), dtype="f4")
                                        if i == 0 else f.__setitem__(f"explainers/cam/x{i}", f["explainers/cam/x0"])
                                        for i in range(3)], "budget"),
    "cam_not_map_shape": (_replace("explainers/cam/cam", data=np.zeros((2, 4, 4), "f4")), "map_shape"),
    "cam_strings": (_replace("explainers/cam/cam", data=np.asarray(["a", "b"], dtype=object),
                             dtype=h5py.string_dtype()), "type"),
    "cam_compound": (_replace("explainers/cam/cam", data=np.zeros(3, dtype=[("a", "f4"), ("b", "i4")])), "type"),
    "null_dataspace": (_null, "no dataspace"),
    "external_storage": (_external_storage, "other files"),
    "virtual_dataset": (_virtual, "other files"),
    "deflate_bomb": (_deflate_bomb, "inflates past"),
    "lzf_bomb": (_lzf_bomb, "inflates past"),
    "filter_order": (_filter_order, "filter pipeline"),
    "deflate_corrupt": (_deflate_corrupt, "corrupt"),
    "many_chunks": (_many_chunks, "chunks"),
    "unsupported_filter": (_scaleoffset, "filter"),
    "too_many_members": (_too_many_members, "members"),
    "probabilities_nan": (_replace("probabilities", data=np.asarray([np.nan, 0.5], np.float32)), "NaN"),
    "probabilities_inf": (_replace("probabilities", data=np.asarray([np.inf, 0.5], np.float32)), "NaN"),
    "probabilities_length": (_replace("probabilities", data=np.zeros(5, np.float32)), "probabilities"),
    "probabilities_2d": (_replace("probabilities", data=np.zeros((2, 2), np.float32)), "probabilities"),
    "probabilities_group": (lambda f: (f.__delitem__("probabilities"), f.create_group("probabilities")),
                            "not a Dataset"),
    "box_inf": (_replace("boxes/cam/xywh", data=np.asarray([[np.inf, 0, 1, 1]])), "finite"),
    "box_negative_size": (_replace("boxes/cam/xywh", data=np.asarray([[0, 0, -5, 1]])), "finite"),
    "box_outside_image": (_replace("boxes/cam/xywh", data=np.asarray([[500.0, 2.0, 3.0, 4.0]])), "outside"),
    "box_far_outside_image": (_replace("boxes/cam/xywh", data=np.asarray([[-1e300, -1e300, 5.0, 5.0]])),
                              "outside"),
    "box_counts_disagree": (_replace("boxes/cam/score", data=np.zeros(3)), "disagree"),
    "box_missing_label": (lambda f: f.__delitem__("boxes/cam/label"), "missing"),
    "box_label_numbers": (_replace("boxes/cam/label", data=np.zeros(1)), "text labels"),
    "box_label_huge": (_vlen_label_huge, "longer than"),
    "native_bad_mode": (_native(mode="cubic"), "bad recipe"),
    "native_box_outside": (_native(box=[0, 100, 0, 10]), "bad recipe"),
    "native_theta_short": (_native(theta_inv=[1.0, 0.0]), "bad recipe"),
    "native_recipe_not_json": (_encoded("native", np.zeros((2, 4, 4), "f4"), recipe="{"), "not valid JSON"),
    "native_recipe_missing": (_encoded("native", np.zeros((2, 4, 4), "f4")), "'recipe' is missing"),
    "native_other_map_shape": (_native(map_shape=[16, 16]), "is not the file's"),
    "native_nan": (_native(np.full((2, 4, 4), np.nan, "f4")), "NaN"),
    "native_integers": (_native(np.zeros((2, 4, 4), "i4")), "native map must be"),
    "native_too_large": (_native(np.zeros((2, 300, 300), "f4")), "native map must be"),
    "native_shrinks": (_native(np.zeros((2, 16, 16), "f4")), "cannot redraw"),
    "native_decode_bomb": (_native_decode_bomb, "budget"),
    "quantised_no_scale": (_encoded("quantised", _Q, offset=np.zeros(2)), "'scale' is missing"),
    "quantised_short_offset": (_encoded("quantised", _Q, offset=np.zeros(1), scale=np.ones(2)), "must be 2 floats"),
    "quantised_inf_scale": (_encoded("quantised", _Q, offset=np.zeros(2), scale=np.asarray([1.0, np.inf])),
                            "NaN or infinite"),
    "quantised_floats": (_encoded("quantised", _Q.astype("f4"), offset=np.zeros(2), scale=np.ones(2)),
                         "unsigned integers"),
    "quantised_not_map_shape": (_encoded("quantised", np.zeros((2, 4, 4), "u2"), offset=np.zeros(2),
                                         scale=np.ones(2)), "map_shape"),
    "unknown_encoding": (_encoded("zstd", np.zeros((2, 8, 8), "f4")), "unknown encoding"),
    "truncated": (_truncate, ""),
    "not_hdf5": (_not_hdf5, "not a readable results file"),
    "directory": (_directory, "not a regular file"),
}
_PATH_EDITS = {_truncate, _not_hdf5, _directory}


def _make(tmp_path: Path, name: str) -> Path:
    p = _valid(tmp_path / f"{name}.h5")
    edit = CASES[name][0]
    if edit in _PATH_EDITS:
        edit(p)
    else:
        with h5py.File(p, "r+") as f:
            edit(f)
    return p


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bounded(fn: Callable[[], object]) -> tuple[BaseException | None, float, int, int]:
    """Run ``fn``; its exception, seconds, tracemalloc peak and peak-RSS growth (bytes)."""
    rss0 = _maxrss_bytes()
    tracemalloc.start()
    t0 = time.perf_counter()
    err: BaseException | None = None
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the test inspects whatever escaped
        err = exc
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return err, dt, peak, _maxrss_bytes() - rss0


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 15


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file_gives_a_typed_one_line_error(tmp_path, name):
    p = _make(tmp_path, name)
    err, dt, peak, rss = _bounded(lambda: read_results(p))
    assert isinstance(err, ResultsFileError), f"{name}: {type(err).__name__}: {err}"
    msg = str(err)
    assert "\n" not in msg and str(p) in msg and CASES[name][1] in msg, msg
    assert dt < 10, (name, dt)
    assert peak < 200 * 2**20 and rss < 2**30, (name, peak, rss)


@pytest.mark.parametrize("name", sorted(CASES))
def test_summary_raises_only_typed_errors(tmp_path, name):
    p = _make(tmp_path, name)
    err, dt, peak, rss = _bounded(lambda: results_summary(p))
    assert err is None or isinstance(err, ResultsFileError), f"{name}: {type(err).__name__}: {err}"
    assert dt < 10 and peak < 200 * 2**20 and rss < 2**30, (name, dt, peak, rss)


def _mutants(base: bytes, rng: np.random.Generator, n: int, max_flips: int, folder: Path):
    """``(i, path)`` of ``n`` copies of ``base`` with 1 to ``max_flips - 1`` random bytes changed (seeded)."""
    for i in range(n):
        b = bytearray(base)
        for _ in range(int(rng.integers(1, max_flips))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        p = folder / f"m{i}.h5"
        p.write_bytes(bytes(b))
        yield i, p


def test_random_byte_mutants_give_typed_errors_only(tmp_path):
    """Byte flips anywhere in a valid file (seeded): a result or a ResultsFileError, fast."""
    base = _valid(tmp_path / "base.h5").read_bytes()
    for i, p in _mutants(base, np.random.default_rng(1), 150, 20, tmp_path):
        for fn in (read_results, results_summary):
            err, dt, peak, rss = _bounded(lambda: fn(p))
            assert err is None or isinstance(err, ResultsFileError), (i, type(err).__name__, err)
            assert dt < 10 and peak < 200 * 2**20 and rss < 2**30, (i, dt, peak, rss)


def test_valid_file_reads_and_its_json_parts_dump_as_strict_json(tmp_path):
    r = read_results(_valid(tmp_path / "ok.h5"))
    assert r.classes == CLASSES and r.boxes["cam"][0].score == 0.5
    json.dumps([r.models, r.timings, r.notices, r.attrs, r.probabilities.tolist()], allow_nan=False)


def test_box_crossing_the_image_edge_is_clipped_to_it(tmp_path):
    p = _valid(tmp_path / "edge.h5")
    with h5py.File(p, "r+") as f:
        _replace("boxes/cam/xywh", data=np.asarray([[-10.0, 60.0, 20.0, 30.0]]))(f)
    b = read_results(p).boxes["cam"][0]
    assert (b.x, b.y, b.w, b.h) == (0.0, 60.0, 10.0, 4.0)  # the image is 64 x 64


@pytest.mark.parametrize("kw", [dict(compression="gzip", shuffle=True, fletcher32=True), dict(compression="lzf"),
                                dict(compression="gzip", chunks=(1, 3, 5)), dict(chunks=(1, 8, 8))])
def test_compressed_and_chunked_maps_still_read(tmp_path, kw):
    p = _valid(tmp_path / "c.h5")
    cam = np.linspace(0, 1, 128, dtype=np.float32).reshape(2, 8, 8)
    cam[1] = 0  # a run that compresses well
    with h5py.File(p, "r+") as f:
        del f["explainers/cam/cam"]
        f.create_dataset("explainers/cam/cam", data=cam, **kw)
    np.testing.assert_array_equal(read_results(p).get("cam", "cam"), cam)


def test_control_characters_in_shown_text_are_replaced(tmp_path):
    p = _valid(tmp_path / "t.h5")
    with h5py.File(p, "r+") as f:
        f.attrs["study_id"] = "evil\u202egnp.exe\nsecond line"
        f.attrs["notices"] = json.dumps(["a\x1b[31mred"])
    r = read_results(p)
    assert r.study_id == "evil\ufffdgnp.exe\ufffdsecond line" and r.notices == ["a\ufffd[31mred"]
    assert results_summary(p)["study_id"] == r.study_id


def test_written_json_is_strict_and_reads_back(tmp_path):
    r = Results(study_id="s", source_path="x", pixel_sha256="0" * 64, image_shape=(8, 8), map_shape=(4, 4),
                timings={"a": float("nan"), "b": 1.0}, maps={"cam": {}},
                attrs={"cam": {"t": np.float32(0.5), "bad": [float("inf")]}})
    p = write_results(r, tmp_path / "j.h5")
    with h5py.File(p, "r") as f:
        for text in (f.attrs["timings"], f["explainers/cam"].attrs["attrs"]):
            json.loads(text, parse_constant=lambda t: pytest.fail(f"{t} written"))
    back = read_results(p)
    assert back.attrs["cam"] == {"t": 0.5, "bad": [None]} and back.timings == {"b": 1.0}


def test_source_path_falls_back_to_a_file_beside_the_results(tmp_path):
    (tmp_path / "chest.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    p = _valid(tmp_path / "r.h5", source="/elsewhere/gone/chest.png")
    assert read_results(p).source_path == str(tmp_path / "chest.png")
    assert results_summary(p)["source_path"] == str(tmp_path / "chest.png")
    assert resolve_source("/elsewhere/none.png", p) == "/elsewhere/none.png"  # not found: unchanged


def test_write_stores_an_absolute_source_path(tmp_path, monkeypatch):
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.chdir(tmp_path)
    p = _valid(tmp_path / "out" / "r.h5", source="img.png")
    with h5py.File(p, "r") as f:
        assert f.attrs["source_path"] == str(tmp_path / "img.png")


def test_worklist_never_turns_a_results_attribute_into_an_arbitrary_file(tmp_path):
    from cxrviewer.core.result_cache import expand_paths

    rows = []
    for i, src in enumerate(("/etc/passwd", str(tmp_path), "/dev/null")):
        rows.append(_valid(tmp_path / f"r{i}.h5", source=src))
    (tmp_path / "notes.png").write_text("not an image")  # named like an image, is not one
    rows.append(_valid(tmp_path / "r3.h5", source=str(tmp_path / "notes.png")))
    wl = expand_paths(rows)
    assert len(wl) == 0 and len(wl.errors) == 4, wl.errors
    assert all("not" in e for e in wl.errors)


def test_worklist_row_for_a_real_image(tmp_path):
    from cxrviewer.core.result_cache import expand_paths

    img = tmp_path / "chest.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    wl = expand_paths([_valid(tmp_path / "r.h5", source=str(img))])
    assert len(wl) == 1 and wl[0].path == img and json.loads(wl[0].extra["findings"])[0][0] == "Nodule"


def test_typed_error_is_a_cxr_error():
    assert issubclass(ResultsFileError, CxrError)


def test_byte_mutants_of_native_and_quantised_maps_give_typed_errors_only(tmp_path):
    """Byte flips in a file holding a native-grid map (with its recipe) and a quantised one."""
    import torch

    from cxrviewer.core.explain.context import Mapper
    from cxrviewer.core.results import NativeLog

    rng = np.random.default_rng(2)
    r = Results(study_id="s1", source_path="x", pixel_sha256="ab" * 32, image_shape=(128, 128), map_shape=(64, 64),
                classes=CLASSES, probabilities=np.asarray([0.2, 0.7], np.float32))
    r.native = NativeLog()
    mp = Mapper((64, 64), (128, 128), (4, 120, 8, 124), torch.tensor([[[1.0, 0.1, 0.05], [-0.1, 1.0, 0.0]]]),
                r.native)
    r.maps = {"cam": {"cam": mp(torch.from_numpy(rng.normal(size=(2, 6, 6)).astype(np.float32)))},
              "anatomy": {"posterior": rng.random((2, 64, 64), dtype=np.float32)}}
    base = write_results(r, tmp_path / "base.h5").read_bytes()
    with h5py.File(tmp_path / "base.h5", "r") as f:
        assert f["explainers/cam/cam"].attrs["encoding"] == "native"
        assert f["explainers/anatomy/posterior"].attrs["encoding"] == "quantised"
    for i, p in _mutants(base, rng, 120, 12, tmp_path):
        err, dt, peak, rss = _bounded(lambda: read_results(p))
        assert err is None or isinstance(err, ResultsFileError), (i, type(err).__name__, err)
        assert dt < 10 and peak < 200 * 2**20 and rss < 2**30, (i, dt, peak, rss)
