"""EncoderModelHandler: reproduces the model's own predict, batches per options, survives bad examples."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras")

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipeline.inference import (
    EncoderChunkHandler,
    EncoderModelHandler,
    InferenceFailure,
    embed_array,
    embed_batch,
    kept_encoder,
    keyed_handler,
    to_model_input,
)
from siamese_core.artefact import load_encoder, load_model_card


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    model, card = load_encoder(tiny_model_dir)
    return model, card


def _images(n: int, shape=(28, 28, 1), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def test_to_model_input_maps_uint8_onto_the_value_range():
    images = [np.array([[[0], [255]], [[51], [102]]], np.uint8)]
    spec = {"height": 2, "width": 2, "channels": 1, "value_range": [0, 255]}
    x = to_model_input(images, spec)
    assert x.dtype == np.float32 and x.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(x[0, :, :, 0], [[0, 255], [51, 102]])
    x = to_model_input(images, dict(spec, value_range=[-1, 1]))
    np.testing.assert_allclose(x[0, :, :, 0], [[-1, 1], [-0.6, -0.2]], atol=1e-6)
    with pytest.raises(ValueError, match="does not match the input spec"):
        to_model_input([np.zeros((2, 3, 1), np.uint8)], spec)


def test_handler_reads_the_card_and_batching_options(tiny_model_dir):
    handler = EncoderModelHandler(tiny_model_dir, min_batch_size=2, max_batch_size=5)
    card = load_model_card(tiny_model_dir)
    assert handler.model_id == card["model_id"]
    assert handler.embedding_dim == card["embedding_dim"] == 8
    assert handler.input_spec == card["input_spec"]
    assert handler.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 5}
    assert handler.share_model_across_processes() is False
    assert EncoderModelHandler(tiny_model_dir, share_across_processes=True).share_model_across_processes()
    assert keyed_handler(handler).batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 5}
    with pytest.raises(ValueError, match="min_batch_size"):
        EncoderModelHandler(tiny_model_dir, min_batch_size=6, max_batch_size=5)


def test_run_inference_equals_model_predict(tiny_model_dir, encoder):
    model, _ = encoder
    handler = EncoderModelHandler(tiny_model_dir)
    images = _images(5)
    results = list(handler.run_inference(images, model))
    want = model.predict(np.stack(images).astype(np.float32), verbose=0)
    assert len(results) == 5
    for image, result, expected in zip(images, results, want):
        assert isinstance(result, PredictionResult)
        assert result.example is image
        assert result.model_id == handler.model_id
        assert result.inference.dtype == np.float32 and result.inference.shape == (8,)
        np.testing.assert_allclose(result.inference, expected, atol=1e-5)
        assert abs(np.linalg.norm(result.inference) - 1.0) < 1e-5


def test_a_bad_example_fails_alone(tiny_model_dir, encoder):
    model, _ = encoder
    handler = EncoderModelHandler(tiny_model_dir)
    images = _images(3)
    batch = [images[0], np.zeros((5, 5, 1), np.uint8), images[1], images[2]]
    results = list(handler.run_inference(batch, model))
    assert len(results) == 4
    assert isinstance(results[1].inference, InferenceFailure)
    assert results[1].inference.error.startswith("ValueError: example of shape (5, 5, 1)")
    want = embed_batch(model, images, handler.input_spec)
    for got, expected in zip([results[0], results[2], results[3]], want):
        np.testing.assert_allclose(got.inference, expected, atol=1e-5)


def test_load_model_refuses_a_changed_artefact(tiny_model_dir):
    card = dict(load_model_card(tiny_model_dir), model_id="ffffffffffffffff")
    with pytest.raises(ValueError, match="changed during the run"):
        EncoderModelHandler(tiny_model_dir, card=card).load_model()


def test_kept_encoder_loads_an_artefact_once_and_again_when_it_is_replaced(tmp_path, monkeypatch):
    from tests.conftest import export_tiny_encoder

    loads = []
    real_load = EncoderModelHandler.load_model
    monkeypatch.setattr(EncoderModelHandler, "load_model", lambda self: loads.append(self.model_id) or real_load(self))
    model_dir = str(tmp_path / "model")
    first_card = export_tiny_encoder(model_dir, seed=3)
    first = kept_encoder(EncoderChunkHandler(model_dir, batch_size=4))
    assert kept_encoder(EncoderChunkHandler(model_dir, batch_size=16)) is first  # the batch size is not the model's
    assert loads == [first_card["model_id"]]
    images = np.stack(_images(3, seed=4))
    before = embed_array(first, images, first_card["input_spec"])

    second_card = export_tiny_encoder(model_dir, seed=5)  # replaced in place: another card
    second = kept_encoder(EncoderChunkHandler(model_dir))
    assert second is not first and loads == [first_card["model_id"], second_card["model_id"]]
    assert not np.allclose(embed_array(second, images, second_card["input_spec"]), before)
    assert kept_encoder(EncoderChunkHandler(model_dir)) is second and len(loads) == 2


def test_value_range_is_applied_for_an_rgb_model(tiny_rgb_model_dir):
    model, card = load_encoder(tiny_rgb_model_dir)
    handler = EncoderModelHandler(tiny_rgb_model_dir)
    images = _images(3, shape=(16, 12, 3), seed=2)
    results = list(handler.run_inference(images, model))
    want = model.predict(np.stack(images).astype(np.float32) / 255.0, verbose=0)
    np.testing.assert_allclose(np.stack([r.inference for r in results]), want, atol=1e-5)


def test_keyed_run_inference_in_a_pipeline(tiny_model_dir, encoder):
    model, _ = encoder
    images = _images(7, seed=3)
    want = model.predict(np.stack(images).astype(np.float32), verbose=0)
    handler = EncoderModelHandler(tiny_model_dir, min_batch_size=1, max_batch_size=3)
    expected = [(f"k{i}", True) for i in range(7)]

    def matches(element):
        key, result = element
        i = int(key[1:])
        return key, bool(np.allclose(result.inference, want[i], atol=1e-5))

    with test_pipeline.TestPipeline() as p:
        out = (p | beam.Create([(f"k{i}", image) for i, image in enumerate(images)])
               | RunInference(keyed_handler(handler))
               | beam.Map(matches))
        assert_that(out, equal_to(expected))


def test_use_accelerator_names_the_devices_tensorflow_sees():
    import tensorflow as tf

    from beam_pipeline.inference import use_accelerator

    gpus = tf.config.list_physical_devices("GPU")
    expected = ", ".join(g.name.replace("/physical_device:", "") for g in gpus) or "CPU"
    assert use_accelerator() == expected
    if not gpus:  # this project's machines: tensorflow-cpu, no GPU
        assert expected == "CPU"


def test_compiled_encoder_equals_the_model_at_any_batch_size(tiny_model_dir, encoder):
    from beam_pipeline.inference import CompiledEncoder

    model, card = encoder
    compiled = CompiledEncoder(model, card["input_spec"])
    x = np.stack(_images(9, seed=4)).astype(np.float32)
    for n in (9, 4, 1):
        np.testing.assert_allclose(compiled.predict_on_batch(x[:n]), model.predict(x[:n], verbose=0), atol=1e-5)
    # One trace serves every batch size.
    assert len(compiled._predict._list_all_concrete_functions_for_serialization()) == 1
    loaded = EncoderModelHandler(tiny_model_dir).load_model()
    assert isinstance(loaded, CompiledEncoder)
    np.testing.assert_allclose(embed_batch(loaded, list(x[:3].astype(np.uint8)), card["input_spec"]),
                               model.predict(x[:3].astype(np.uint8).astype(np.float32), verbose=0), atol=1e-5)


# ------------------------------------------------------------------------------------------ chunks


def test_chunk_handler_batches_by_images_and_maps_results_back(tiny_model_dir, encoder):
    from beam_pipeline.inference import ChunkEmbeddings, EncoderChunkHandler, ImageChunk, chunk_size

    model, _ = encoder
    handler = EncoderChunkHandler(tiny_model_dir, batch_size=4)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 4,
                                               "element_size_fn": chunk_size}
    images = np.stack(_images(7, seed=5))
    chunks = [ImageChunk("a", images[:3]), ImageChunk("b", images[3:4]), ImageChunk("c", images[4:])]
    calls = []

    class Spy:
        def predict_on_batch(self, x):
            calls.append(len(x))
            return model.predict_on_batch(x)

    results = list(handler.run_inference(chunks, Spy()))
    assert calls == [4, 3]  # model batches of batch_size images across chunk boundaries
    want = model.predict(images.astype(np.float32), verbose=0)
    assert [r.example.key for r in results] == ["a", "b", "c"]
    for result, rows in zip(results, (slice(0, 3), slice(3, 4), slice(4, 7))):
        assert isinstance(result.inference, ChunkEmbeddings) and result.inference.errors == {}
        np.testing.assert_allclose(result.inference.embeddings, want[rows], atol=1e-5)
    assert handler.run_inference([], Spy()) == []
    assert handler.get_num_bytes(chunks) == images.nbytes


def test_chunk_handler_fails_only_the_bad_image(tiny_model_dir, encoder):
    from beam_pipeline.inference import EncoderChunkHandler, ImageChunk

    model, _ = encoder

    class Fussy:  # refuses any batch holding an all-white image
        def predict_on_batch(self, x):
            if (x.reshape(len(x), -1) == 255).all(axis=1).any():
                raise ValueError("white image")
            return model.predict_on_batch(x)

    images = np.stack(_images(5, seed=6))
    images[3] = 255
    handler = EncoderChunkHandler(tiny_model_dir, batch_size=8)
    a, b = handler.run_inference([ImageChunk("a", images[:2]), ImageChunk("b", images[2:])], Fussy())
    assert a.inference.errors == {} and b.inference.errors == {1: "ValueError: white image"}
    want = model.predict(images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(a.inference.embeddings, want[:2], atol=1e-5)
    np.testing.assert_allclose(b.inference.embeddings[[0, 2]], want[[2, 4]], atol=1e-5)


def test_chunks_through_run_inference(tiny_model_dir, encoder):
    from beam_pipeline.inference import EncoderChunkHandler, ImageChunk

    model, _ = encoder
    images = np.stack(_images(10, seed=7))
    want = model.predict(images.astype(np.float32), verbose=0)
    chunks = [ImageChunk(i, images[i:i + 2]) for i in range(0, 10, 2)]

    def check(result):
        i = result.example.key
        return i, bool(np.allclose(result.inference.embeddings, want[i:i + 2], atol=1e-5))

    with test_pipeline.TestPipeline() as p:
        out = (p | beam.Create(chunks) | RunInference(EncoderChunkHandler(tiny_model_dir, batch_size=3))
               | beam.Map(check))
        assert_that(out, equal_to([(i, True) for i in range(0, 10, 2)]))
