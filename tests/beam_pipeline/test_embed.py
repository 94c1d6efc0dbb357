"""The embed pipeline on a tiny catalogue: exact templates and failures, every item accounted for."""
from __future__ import annotations

import datetime
import hashlib
import io
import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytest.importorskip("keras")

from apache_beam.pvalue import TaggedOutput
from apache_beam.testing import test_pipeline

from beam_pipeline import embed
from siamese_core.decode import DEFAULT_MAX_PIXELS, decode_image
from beam_pipeline.io import read_table_dir
from schemas.tables import embeddings_as_numpy, templates_schema
from siamese_core.artefact import load_encoder

MAX_FILE_BYTES = 20_000
VALID = {  # item id -> (width, height) of the file
    "a.png": (28, 28),
    "shelf/a_copy.png": (28, 28),  # the same bytes as a.png: embedded once
    "b.png": (28, 28),
    "c_rgb.png": (40, 30),
    "d_rgba.png": (28, 28),
    "shelf/e.png": (28, 28),
    "shelf/f_palette.png": (20, 24),
}
# item id -> (stage, start of the error)
BROKEN = {
    "broken/truncated.png": ("decode", "DecodeError: truncated"),
    "notes.png": ("decode", "DecodeError: not_an_image"),
    "huge.png": ("read", "OSError: file of "),
}


def _png(image) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_catalogue(root) -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    encode = _png
    files = {
        "a.png": encode(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
        "b.png": encode(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
        "c_rgb.png": encode(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),
        "d_rgba.png": encode(rng.integers(0, 256, (28, 28, 4), dtype=np.uint8)),
        "shelf/e.png": encode(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
        "shelf/f_palette.png": encode(Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).quantize(16)),
        "notes.png": b"these are not the pixels you are looking for\n",
        "huge.png": encode(rng.integers(0, 256, (200, 200), dtype=np.uint8)),
    }
    files["broken/truncated.png"] = files["a.png"][: len(files["a.png"]) // 2]
    files["shelf/a_copy.png"] = files["a.png"]
    assert len(files["huge.png"]) > MAX_FILE_BYTES > max(len(files[k]) for k in VALID)
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return files


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_model_dir):
    """Run the pipeline once on the catalogue; (summary, catalogue dir, output dir, files, start, end)."""
    root = tmp_path_factory.mktemp("catalogue")
    out = tmp_path_factory.mktemp("embed_out")
    files = _write_catalogue(str(root / "images"))
    # A shard left by an earlier run with another shard count must not survive into this run's table.
    os.makedirs(out / "templates")
    stale = out / "templates" / "templates-00007-of-00009.parquet"
    stale.write_bytes(b"stale")
    start = datetime.datetime.now(datetime.timezone.utc)
    summary = embed.run(
        ["--input", str(root / "images" / "**"), "--model_dir", tiny_model_dir, "--output", str(out),
         "--run_id", "test-run-1", "--batch_size", "4", "--max_file_bytes", str(MAX_FILE_BYTES),
         "--row_group_rows", "3", "--num_shards", "1"],
        test_pipeline=test_pipeline.TestPipeline(),
    )
    end = datetime.datetime.now(datetime.timezone.utc)
    return summary, str(root / "images"), str(out), files, start, end


def test_summary(embedded, tiny_model_dir):
    summary, _, out, _, _, _ = embedded
    _, card = load_encoder(tiny_model_dir)
    assert summary["templates"] == os.path.join(out, "templates")
    assert summary["failures"] == os.path.join(out, "failures")
    assert (summary["items"], summary["embedded"], summary["failed"]) == (10, 7, 3)
    assert summary["inferences_saved"] == 1
    assert summary["run_id"] == "test-run-1"
    assert summary["model_id"] == card["model_id"]
    assert summary["input_format"] == "files"
    assert summary["counters"] == {"items_read": 10, "read_failed": 1, "decoded": 7, "decode_failed": 2,
                                   "inferences": 6, "inferences_saved": 1, "embedded": 7, "failed": 3}
    assert summary["seconds"] > 0
    assert not os.path.exists(os.path.join(out, "templates", "templates-00007-of-00009.parquet"))


def test_templates_are_exact(embedded, tiny_model_dir):
    _, images_dir, out, files, start, end = embedded
    model, card = load_encoder(tiny_model_dir)
    templates = read_table_dir(out, "templates", card["embedding_dim"]).sort_by("item_id")
    ids = templates.column("item_id").to_pylist()
    assert ids == sorted(VALID)
    assert templates.column("source_uri").to_pylist() == [os.path.join(images_dir, i) for i in ids]
    assert templates.column("content_sha256").to_pylist() == [hashlib.sha256(files[i]).hexdigest() for i in ids]
    assert templates.column("width").to_pylist() == [VALID[i][0] for i in ids]
    assert templates.column("height").to_pylist() == [VALID[i][1] for i in ids]
    assert set(templates.column("model_id").to_pylist()) == {card["model_id"]}
    assert set(templates.column("run_id").to_pylist()) == {"test-run-1"}
    stamps = templates.column("embedded_at").to_pylist()
    assert all(start <= s <= end for s in stamps)

    # The pipeline's embeddings are the model's own predictions on the decoded pixels.
    pixels = np.stack([decode_image(files[i], card["input_spec"]).pixels for i in ids]).astype(np.float32)
    want = model.predict(pixels, verbose=0)
    embeddings = embeddings_as_numpy(templates)
    np.testing.assert_allclose(embeddings, want, atol=1e-5)
    # The copy shares the original's embedding exactly: one inference for both.
    np.testing.assert_array_equal(embeddings[ids.index("a.png")], embeddings[ids.index("shelf/a_copy.png")])

    # Row groups of --row_group_rows (3 here): the matching stage reads templates in blocks.
    import pyarrow.parquet as pq
    from beam_pipeline.io import match_paths, table_glob
    sizes = [pq.ParquetFile(p).metadata.row_group(g).num_rows
             for p in match_paths(table_glob(out, "templates")) for g in range(pq.ParquetFile(p).metadata.num_row_groups)]
    assert sum(sizes) == 7 and all(n == 3 for n in sizes[:-1]) and 1 <= sizes[-1] <= 3, sizes


def test_failures_are_exact(embedded):
    _, images_dir, out, files, _, _ = embedded
    failures = read_table_dir(out, "failures").sort_by("item_id")
    rows = failures.to_pylist()
    assert [r["item_id"] for r in rows] == sorted(BROKEN)
    for row in rows:
        stage, error = BROKEN[row["item_id"]]
        assert row["stage"] == stage
        assert row["error"].startswith(error), row["error"]
        assert row["source_uri"] == os.path.join(images_dir, row["item_id"])
        assert row["run_id"] == "test-run-1"
    huge = next(r for r in rows if r["item_id"] == "huge.png")
    assert huge["error"] == (f"OSError: file of {len(files['huge.png'])} bytes exceeds "
                             f"--max_file_bytes={MAX_FILE_BYTES}")


def test_every_item_ends_in_exactly_one_table(embedded):
    _, images_dir, out, files, _, _ = embedded
    templates = set(read_table_dir(out, "templates").column("item_id").to_pylist())
    failures = set(read_table_dir(out, "failures").column("item_id").to_pylist())
    assert templates.isdisjoint(failures)
    assert templates | failures == set(files)


def test_no_matching_input_is_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="matches no files"):
        embed.run(["--input", str(tmp_path / "*.png"), "--model_dir", tiny_model_dir, "--output", str(tmp_path)])


# ------------------------------------------------------------------------------------- row building


def _process(fn, element):
    fn.setup()
    return list(fn.process(element))


def _chunk_result(contents, embeddings, errors=None):
    from apache_beam.ml.inference.base import PredictionResult

    from beam_pipeline.inference import ChunkEmbeddings, ImageChunk

    embeddings = np.asarray(embeddings, np.float32)
    chunk = ImageChunk(tuple(contents), np.zeros((len(contents), 2, 2, 1), np.uint8))
    return PredictionResult(chunk, ChunkEmbeddings(embeddings, errors or {}), "m")


def test_templates_failures_and_copies_from_a_chunk():
    fn = embed.ToTemplatesFn("0123456789abcdef", 3, "r")
    x, y, z = (embed.ItemRef(i, f"/cat/{i}") for i in ("x.png", "y.png", "z.png"))
    contents = [embed.Content("ab" * 32, (x, y), 10, 12),  # two items with the same bytes
                embed.Content("cd" * 32, (z,), 5, 6),
                embed.Content("ef" * 32, (embed.ItemRef("w.png", "/cat/w.png"),), 1, 1),
                embed.Content("01" * 32, (embed.ItemRef("v.png", "/cat/v.png"),), 1, 1)]
    good, other = [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]
    outs = _process(fn, _chunk_result(contents, [good, other, [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
                                      errors={3: "ValueError: boom"}))
    [table] = [o for o in outs if not isinstance(o, TaggedOutput)]
    assert table.schema.equals(templates_schema(3))
    rows = table.to_pylist()
    assert [r["item_id"] for r in rows] == ["x.png", "y.png", "z.png"]
    assert [r["source_uri"] for r in rows] == ["/cat/x.png", "/cat/y.png", "/cat/z.png"]
    assert [r["content_sha256"] for r in rows] == ["ab" * 32, "ab" * 32, "cd" * 32]
    assert [(r["width"], r["height"]) for r in rows] == [(10, 12), (10, 12), (5, 6)]
    assert {r["model_id"] for r in rows} == {"0123456789abcdef"} and {r["run_id"] for r in rows} == {"r"}
    np.testing.assert_array_equal(embeddings_as_numpy(table), np.array([good, good, other], np.float32))
    failures = [o.value for o in outs if isinstance(o, TaggedOutput)]
    assert all(o.tag == embed.FAILURES_TAG for o in outs if isinstance(o, TaggedOutput))
    assert failures == [
        {"item_id": "w.png", "source_uri": "/cat/w.png", "stage": "validate",
         "error": "embedding norm is 1.414214, not 1", "run_id": "r"},
        {"item_id": "v.png", "source_uri": "/cat/v.png", "stage": "inference", "error": "ValueError: boom",
         "run_id": "r"}]
    # Back to rows (record formats check ids row by row).
    [(item_id, row), *_] = list(embed.table_rows(table))
    assert item_id == "x.png" and row["content_sha256"] == "ab" * 32
    np.testing.assert_array_equal(row["embedding"], np.array(good, np.float32))


def test_first_copies_keeps_one_image_per_content():
    spec = {"height": 2, "width": 2, "channels": 1, "value_range": [0, 255]}
    fn = embed.FirstCopiesFn(spec)
    pixels = bytes(range(12))  # three 2x2x1 images
    chunk = (("s1", "s2", "s1"), (("b", "u/b"), ("c", "u/c"), ("a", "u/a")), ((4, 3), (5, 5), (4, 3)), pixels)
    # s1 is shared by a (first: it sorts first, whatever chunk it is in), b and d (in another chunk).
    duplicates = {"s1": (("a", "u/a"), ("b", "u/b"), ("d", "u/d"))}
    [out] = list(fn.process(chunk, duplicates))
    assert out.key == (embed.Content("s2", (embed.ItemRef("c", "u/c"),), 5, 5),
                       embed.Content("s1", tuple(embed.ItemRef(*i) for i in duplicates["s1"]), 4, 3))
    np.testing.assert_array_equal(out.pixels, np.frombuffer(pixels, np.uint8).reshape(3, 2, 2, 1)[[1, 2]])
    assert list(fn.process((("s1",), (("d", "u/d"),), ((4, 3),), bytes(4)), duplicates)) == []
    assert embed.shared_contents(("s", [("b", "u"), ("a", "v")])) == [("s", (("a", "v"), ("b", "u")))]
    assert embed.shared_contents(("s", [("b", "u")])) == []


@pytest.mark.parametrize("threads", [1, 3])
def test_decode_makes_chunks_and_fails_per_item(threads):
    from apache_beam.utils.windowed_value import WindowedValue

    from beam_pipeline.sources import Record

    spec = {"height": 4, "width": 4, "channels": 1, "value_range": [0, 255]}
    fn = embed.DecodeFn(spec, 10**6, "r", chunk_items=2, threads=threads)
    fn.setup()
    fn.start_bundle()
    data = [_png(np.full((6, 8), v, np.uint8)) for v in (9, 10, 11)]
    outs = [o for i, d in enumerate(data) for o in fn.process(Record(f"i{i}", f"u/i{i}", d))]
    outs += list(fn.process(Record("bad", "u/bad", b"")))
    outs += list(fn.finish_bundle())
    fn.teardown()

    def value(o):  # what finish_bundle emits leaves as windowed values
        return o.value if isinstance(o, WindowedValue) else o

    tagged = [(o.tag, value(o.value)) for o in outs if isinstance(o, TaggedOutput)]
    contents = [v for tag, v in tagged if tag == embed.CONTENTS_TAG]
    assert contents == [(hashlib.sha256(d).hexdigest(), (f"i{i}", f"u/i{i}")) for i, d in enumerate(data)]
    [failure] = [v for tag, v in tagged if tag == embed.FAILURES_TAG]
    assert (failure["item_id"], failure["stage"], failure["error"]) == ("bad", "decode", "DecodeError: empty: zero bytes")
    chunks = [o for o in outs if not isinstance(o, TaggedOutput)]
    first, last = chunks[0], chunks[1]
    assert not isinstance(first, WindowedValue) and isinstance(last, WindowedValue)
    last = last.value
    assert first[1] == (("i0", "u/i0"), ("i1", "u/i1")) and first[2] == ((8, 6), (8, 6))
    assert first[3] == bytes([9] * 16 + [10] * 16)
    assert last[0] == (hashlib.sha256(data[2]).hexdigest(),) and last[3] == bytes([11] * 16)


def test_decode_threads():
    assert embed.decode_threads(3) == 3
    assert 1 <= embed.decode_threads(0) <= 4


def test_unique_ids_keeps_the_first_read():
    fn = embed.UniqueIdsFn("r")
    rows = [{"item_id": "k", "source_uri": f"s.tfrecord#{i}"} for i in (10, 2, 7)]
    kept, *dropped = list(fn.process(("k", rows)))
    assert kept["source_uri"] == "s.tfrecord#2"
    assert [d.value["source_uri"] for d in dropped] == ["s.tfrecord#7", "s.tfrecord#10"]
    assert dropped[0].value["error"] == "duplicate item_id: also read from s.tfrecord#2, which was kept"
    assert dropped[0].value["stage"] == "validate"
    assert sorted(["b#x", "a#3", "a#10", "a#2"], key=embed.uri_order) == ["a#2", "a#3", "a#10", "b#x"]


def test_check_embedding():
    assert embed.check_embedding(np.array([0.0, 1.0], np.float32), 2) is None
    assert embed.check_embedding(np.array([0.0, 1.0005], np.float32), 2) is None  # within the reader's 1e-3
    assert "shape" in embed.check_embedding(np.zeros(3, np.float32), 2)
    assert "NaN" in embed.check_embedding(np.array([np.nan, 1.0], np.float32), 2)
    assert "norm" in embed.check_embedding(np.array([0.0, 0.5], np.float32), 2)


def test_gcs_catalogue_model_and_output(gcs_bucket, tiny_model_dir):
    """Input files, the model artefact and the tables all on gs:// (an in-process GCS emulator)."""
    from apache_beam.io.filesystems import FileSystems

    def put(path, data):
        with FileSystems.create(path) as f:
            f.write(data)

    base = f"{gcs_bucket}/embed_test"
    rng = np.random.default_rng(9)
    valid = {"x/1.png": _png(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
             "2.png": _png(rng.integers(0, 256, (28, 28), dtype=np.uint8))}
    for name, data in {**valid, "x/bad.png": b""}.items():
        put(f"{base}/cat/{name}", data)
    for name in ("model.keras", "model_card.json"):
        with open(os.path.join(tiny_model_dir, name), "rb") as f:
            put(f"{base}/model/{name}", f.read())

    summary = embed.run(
        ["--input", f"{base}/cat/**", "--model_dir", f"{base}/model", "--output", f"{base}/out", "--run_id", "gcs"],
        test_pipeline=test_pipeline.TestPipeline(),
    )
    assert (summary["items"], summary["embedded"], summary["failed"]) == (3, 2, 1)
    assert summary["templates"] == f"{base}/out/templates"
    templates = read_table_dir(f"{base}/out", "templates").sort_by("item_id")
    assert templates.column("item_id").to_pylist() == ["2.png", "x/1.png"]
    assert templates.column("source_uri").to_pylist() == [f"{base}/cat/2.png", f"{base}/cat/x/1.png"]
    model, card = load_encoder(tiny_model_dir)
    pixels = np.stack([decode_image(valid[i], card["input_spec"]).pixels for i in ("2.png", "x/1.png")])
    np.testing.assert_allclose(embeddings_as_numpy(templates), model.predict(pixels.astype(np.float32), verbose=0),
                               atol=1e-5)
    [failure] = read_table_dir(f"{base}/out", "failures").to_pylist()
    assert (failure["item_id"], failure["stage"], failure["error"]) == ("x/bad.png", "decode", "DecodeError: empty: zero bytes")


# ------------------------------------------------------------------------------- record formats, local and gs://


def _shard_catalogue(fmt: str, put, base: str):
    """Write a two-shard catalogue in `fmt` with `put(path, bytes)` under `base`.

    Shard a: sku-1, sku-2, sku-3 (the same bytes as sku-1), sku-2 again (other bytes: a repeated id), sku-4
    (not an image). Shard b: broken (cut after one good record where the format allows it).
    Returns (glob, label_key, templates {item_id: bytes}, failures {item_id: (stage, error start)},
    labels: sorted [(item_id, label)] of the records read).
    """
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from beam_pipeline.sources import tfrecord

    rng = np.random.default_rng(21)
    png = [_png(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(4)]
    rows = [("sku-1", png[0], "shoe"), ("sku-2", png[1], "bag"), ("sku-3", png[0], "shoe"),
            ("sku-2", png[2], "hat"), ("sku-4", b"name,price\nshoe,10\n", "sock")]
    if fmt == "tfrecord":
        def shard(rows):
            buffer = io.BytesIO()
            tfrecord.write_tfrecords(buffer, [tfrecord.make_example({"image/encoded": d, "image/id": i, "label": c})
                                              for i, d, c in rows])
            return buffer.getvalue()
        put(f"{base}/a.tfrecord", shard(rows))
        put(f"{base}/b.tfrecord", shard([("sku-5", png[3], "cap"), ("sku-6", png[3], "cap")])[:-10])
        ids = {"sku-1": "sku-1", "sku-2": "sku-2", "sku-3": "sku-3", "sku-4": "sku-4", "sku-5": "sku-5"}
        broken = {"b.tfrecord#rest@1": ("read", "CorruptShardError: record 1 at byte")}
        glob, label_key = f"{base}/*.tfrecord", "label"
    elif fmt == "parquet":
        buffer = io.BytesIO()
        pq.write_table(pa.table({"id": [r[0] for r in rows], "image": [r[1] for r in rows],
                                 "label": [r[2] for r in rows]}), buffer, row_group_size=2)
        put(f"{base}/a.parquet", buffer.getvalue())
        put(f"{base}/b.parquet", buffer.getvalue()[:-30])  # the footer is gone: nothing can be read
        ids = {"sku-1": "sku-1", "sku-2": "sku-2", "sku-3": "sku-3", "sku-4": "sku-4"}
        broken = {"b.parquet": ("read", "")}
        glob, label_key = f"{base}/*.parquet", "label"
    else:
        def shard(rows):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as archive:
                for i, d, c in rows:
                    for name, data in ((f"{i}.png", d), (f"{i}.cls", c.encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        archive.addfile(info, io.BytesIO(data))
            return buffer.getvalue()
        put(f"{base}/a.tar", shard(rows))
        put(f"{base}/b.tar", shard([("sku-5", png[3], "cap"), ("sku-6", png[3], "cap")])[:2048 + 700])
        ids = {k: f"{'b' if k == 'sku-5' else 'a'}.tar#{k}.png" for k in ("sku-1", "sku-2", "sku-3", "sku-4", "sku-5")}
        broken = {"b.tar#rest@1": ("read", "ReadError")}
        glob, label_key = f"{base}/*.tar", "cls"
    templates = {ids["sku-1"]: png[0], ids["sku-2"]: png[1], ids["sku-3"]: png[0]}
    labels = [(ids[i], c) for i, _, c in rows]  # every record read, the repeated id included
    if "sku-5" in ids:
        templates[ids["sku-5"]] = png[3]
        labels.append((ids["sku-5"], "cap"))
    failures = {ids["sku-4"]: ("decode", "DecodeError: not_an_image"),
                ids["sku-2"]: ("validate", "duplicate item_id: also read from "), **broken}
    return glob, label_key, templates, failures, sorted(labels)


@pytest.mark.parametrize("where", ["local", "gcs"])
@pytest.mark.parametrize("fmt", ["tfrecord", "parquet", "tar"])
def test_record_formats_end_to_end(fmt, where, tmp_path, request, tiny_model_dir):
    from apache_beam.io.filesystems import FileSystems

    if where == "gcs":
        base = f"{request.getfixturevalue('gcs_bucket')}/records_{fmt}"
    else:
        base = str(tmp_path)

    def put(path, data):
        with FileSystems.create(path) as f:
            f.write(data)

    glob, label_key, want_templates, want_failures, want_labels = _shard_catalogue(fmt, put, f"{base}/cat")
    out = f"{base}/out"
    summary = embed.run(["--input", glob, "--model_dir", tiny_model_dir, "--output", out, "--run_id", "rec",
                         "--label_key", label_key], test_pipeline=test_pipeline.TestPipeline())
    assert summary["input_format"] == fmt
    assert (summary["embedded"], summary["failed"]) == (len(want_templates), len(want_failures))
    assert summary["inferences_saved"] == 1  # sku-3 has sku-1's bytes
    assert summary["counters"]["items_read"] == summary["items"] == len(want_templates) + len(want_failures)

    model, card = load_encoder(tiny_model_dir)
    templates = read_table_dir(out, "templates", card["embedding_dim"]).sort_by("item_id")
    ids = templates.column("item_id").to_pylist()
    assert ids == sorted(want_templates)
    assert templates.column("content_sha256").to_pylist() == [hashlib.sha256(want_templates[i]).hexdigest() for i in ids]
    pixels = np.stack([decode_image(want_templates[i], card["input_spec"]).pixels for i in ids]).astype(np.float32)
    np.testing.assert_allclose(embeddings_as_numpy(templates), model.predict(pixels, verbose=0), atol=1e-5)

    failures = {r["item_id"]: r for r in read_table_dir(out, "failures").to_pylist()}
    assert sorted(failures) == sorted(want_failures)
    for item_id, (stage, error) in want_failures.items():
        assert failures[item_id]["stage"] == stage and failures[item_id]["error"].startswith(error), failures[item_id]
    # The repeated id kept the record read first (the one with sku-2's first bytes), and says so.
    kept = templates.filter(pc.equal(templates.column("item_id"), [i for i in ids if "sku-2" in i][0]))
    assert failures[kept.column("item_id")[0].as_py()]["error"].endswith(
        f"{kept.column('source_uri')[0].as_py()}, which was kept")
    uris = templates.column("source_uri").to_pylist() + [r["source_uri"] for r in failures.values()]
    assert len(set(uris)) == len(uris) and all(u.startswith(f"{base}/cat/") for u in uris)

    labels = _read_rows(f"{out}/labels/labels-*.parquet")
    assert sorted((r["item_id"], r["label"]) for r in labels) == want_labels
    assert {r["run_id"] for r in labels} == {"rec"}
    assert summary["labels"] == f"{out}/labels"


def _read_rows(glob: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from beam_pipeline.io import match_paths

    rows = []
    for path in match_paths(glob):
        with FileSystems.open(path) as f:
            rows += pq.read_table(pa.BufferReader(f.read())).to_pylist()
    return rows


def test_template_row_groups_default_to_the_match_block_size():
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_pipeline.options import EmbedOptions, MatchOptions

    options = PipelineOptions([])
    assert options.view_as(EmbedOptions).row_group_rows == options.view_as(MatchOptions).block_size


def test_input_list_embeds_only_the_listed_files(tmp_path, tiny_model_dir):
    from PIL import Image

    os.makedirs(tmp_path / "cat" / "sub")
    names = ["a.png", "b.png", "sub/c.png"]
    for k, name in enumerate(names):
        Image.fromarray(np.full((28, 28), 30 * k, np.uint8)).save(tmp_path / "cat" / name)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'cat' / 'b.png'}\n\n{tmp_path / 'cat' / 'sub' / 'c.png'}\n")
    out = tmp_path / "out"
    summary = embed.run(["--input", str(tmp_path / "cat" / "**" / "*.png"), "--input_list", str(listing),
                         "--model_dir", tiny_model_dir, "--output", str(out)])
    assert (summary["embedded"], summary["failed"]) == (2, 0)
    ids = sorted(pq.read_table(out / "templates").column("item_id").to_pylist())
    assert ids == ["b.png", "sub/c.png"]  # ids relative to --input's prefix, as a full run gives them
    listing.write_text(f"{tmp_path / 'elsewhere.png'}\n")
    with pytest.raises(ValueError, match="does not lie under the prefix"):
        embed.run(["--input", str(tmp_path / "cat" / "*.png"), "--input_list", str(listing),
                   "--model_dir", tiny_model_dir, "--output", str(out)])


def test_embedding_files_in_process_gives_the_pipelines_tables(embedded, tiny_model_dir):
    """embed_files_locally (nightly's local engine) on the same catalogue: the pipeline's rows exactly
    (identical bytes embedded once and shared, the same failures with the same reasons)."""
    from beam_pipeline import sources
    from beam_pipeline.inference import EncoderChunkHandler

    _, images, out, files, _, _ = embedded
    glob = os.path.join(images, "**")
    listed = [(entry.path, entry.size) for entry in sources.list_catalogue(glob)]
    handler = EncoderChunkHandler(tiny_model_dir, batch_size=4)
    templates, failures = embed.embed_files_locally(listed, glob, handler, "test-run-1", max_file_bytes=MAX_FILE_BYTES,
                                                    max_pixels=DEFAULT_MAX_PIXELS, threads=2)
    want = read_table_dir(out, "templates")
    assert templates.schema.equals(templates_schema(want.schema.field("embedding").type.list_size))
    assert templates.column("item_id").to_pylist() == sorted(VALID)
    columns = ["item_id", "source_uri", "content_sha256", "model_id", "width", "height", "run_id"]
    assert templates.select(columns).to_pylist() == want.select(columns).sort_by("item_id").to_pylist()
    np.testing.assert_allclose(embeddings_as_numpy(templates),
                               embeddings_as_numpy(want.sort_by("item_id")), atol=1e-6)
    got_failures = sorted((r["item_id"], r["stage"], r["error"]) for r in failures.to_pylist())
    want_failures = sorted((r["item_id"], r["stage"], r["error"]) for r in read_table_dir(out, "failures").to_pylist())
    assert got_failures == want_failures and len(got_failures) == len(BROKEN)
    assert len(templates) + len(failures) == len(files)
