"""The embed pipeline on a tiny catalogue: exact templates and failures, every item accounted for."""
from __future__ import annotations

import datetime
import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("keras")

from apache_beam.ml.inference.base import PredictionResult
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing import test_pipeline

from beam_pipeline import embed
from beam_pipeline.decode import decode_image
from beam_pipeline.inference import InferenceFailure
from beam_pipeline.io import read_table_dir
from schemas.tables import embeddings_as_numpy
from trainer.export import load_encoder

MAX_FILE_BYTES = 20_000
VALID = {  # item id -> (width, height) of the file
    "a.png": (28, 28),
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
         "--run_id", "test-run-1", "--batch_size", "4", "--max_file_bytes", str(MAX_FILE_BYTES)],
        test_pipeline=test_pipeline.TestPipeline(),
    )
    end = datetime.datetime.now(datetime.timezone.utc)
    return summary, str(root / "images"), str(out), files, start, end


def test_summary(embedded, tiny_model_dir):
    summary, _, out, _, _, _ = embedded
    _, card = load_encoder(tiny_model_dir)
    assert summary["templates"] == os.path.join(out, "templates")
    assert summary["failures"] == os.path.join(out, "failures")
    assert (summary["items"], summary["embedded"], summary["failed"]) == (9, 6, 3)
    assert summary["run_id"] == "test-run-1"
    assert summary["model_id"] == card["model_id"]
    assert summary["counters"] == {"items_read": 9, "decoded": 6, "embedded": 6, "failed": 3}
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
    np.testing.assert_allclose(embeddings_as_numpy(templates), want, atol=1e-5)


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


def test_inference_and_validation_failures_become_failures_rows():
    info = embed.ItemInfo("x.png", "/cat/x.png", "ab" * 32, 10, 12)
    fn = embed.ToTemplateFn("0123456789abcdef", 3, "r")
    good = np.array([0.6, 0.8, 0.0], np.float32)
    [row] = _process(fn, (info, PredictionResult(None, good, "0123456789abcdef")))
    assert row["item_id"] == "x.png" and row["width"] == 10 and row["height"] == 12
    np.testing.assert_array_equal(row["embedding"], good)

    [out] = _process(fn, (info, PredictionResult(None, InferenceFailure("ValueError: boom"), "m")))
    assert isinstance(out, TaggedOutput) and out.tag == embed.FAILURES_TAG
    assert out.value == {"item_id": "x.png", "source_uri": "/cat/x.png", "stage": "inference",
                         "error": "ValueError: boom", "run_id": "r"}

    [out] = _process(fn, (info, PredictionResult(None, np.array([1.0, 1.0, 0.0], np.float32), "m")))
    assert out.value["stage"] == "validate" and out.value["error"] == "embedding norm is 1.414214, not 1"


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
