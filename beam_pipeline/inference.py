"""RunInference model handlers for the encoder artefact (model.keras + model_card.json).

Our own `ModelHandler`s rather than `apache_beam.ml.inference.tensorflow_inference` (which needs
tensorflow_hub and knows nothing of the model card): they load the artefact with
`siamese_core.artefact.load_encoder`, feed batches of decoded uint8 pixels in the card's value range, and never
let one bad example fail a batch: when a batch raises, each example is retried alone and the ones that
still fail come back as failures, which the embed pipeline writes to the failures table (stage
"inference").

- `EncoderModelHandler`: one example = one image (uint8 (H, W, C)); batches of `max_batch_size` images.
- `EncoderChunkHandler`: one example = an `ImageChunk` of images (the embed pipeline's elements: a
  pipeline element per image costs more than decoding it); the chunks of a RunInference batch are
  predicted in model batches of exactly `batch_size` images (the last one shorter).

TensorFlow is imported only when the model is loaded (on the worker), not when the pipeline is built.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult

from beam_pipeline import runner
from siamese_core.decode import spec_shape

log = logging.getLogger(__name__)


class InferenceFailure(NamedTuple):
    """The `inference` of a PredictionResult whose example could not be embedded."""

    error: str


def _to_value_range(x: np.ndarray, input_spec: dict) -> np.ndarray:
    """float32 pixels 0..255 mapped linearly onto the card's value_range (identity for [0, 255]: the model
    rescales inside)."""
    lo, hi = (float(v) for v in input_spec["value_range"])
    return x if (lo, hi) == (0.0, 255.0) else lo + x * ((hi - lo) / 255.0)


def _predict(model, x: np.ndarray) -> np.ndarray:
    """model.predict_on_batch(x) as float32 (n, dim), checked to have a row per example."""
    embeddings = np.asarray(model.predict_on_batch(x), dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(x):
        raise ValueError(f"model returned shape {embeddings.shape} for {len(x)} examples")
    return embeddings


def to_model_input(pixels: Sequence[np.ndarray], input_spec: dict) -> np.ndarray:
    """Stack decoded uint8 images (H, W, C) into the model's float32 input (n, H, W, C).

    uint8 0..255 is mapped linearly onto the card's value_range (identity for the default [0, 255]; the
    model rescales inside). Raises ValueError if an image does not have the spec's shape.
    """
    shape = spec_shape(input_spec)
    for image in pixels:
        if np.shape(image) != shape:
            raise ValueError(f"example of shape {np.shape(image)} does not match the input spec {shape}")
    return _to_value_range(np.stack([np.asarray(image) for image in pixels]).astype(np.float32), input_spec)


class CompiledEncoder:
    """A Keras encoder behind one tf.function traced for any batch size of the input spec.

    Keras' `predict_on_batch` traces its predict step again when the batch size changes (the last batch
    of a bundle is short; BatchElements varies sizes) and adds per-call overhead; this traces once, on
    the first call (or `warm_up`). `predict_on_batch(x)` -> numpy float32 (n, dim), like Keras'.
    """

    def __init__(self, model, input_spec: dict):
        import tensorflow as tf

        self.model = model
        shape = (None,) + spec_shape(input_spec)
        self._predict = tf.function(lambda x: model(x, training=False),
                                    input_signature=[tf.TensorSpec(shape, tf.float32)])
        self._shape = shape

    def warm_up(self) -> None:
        self.predict_on_batch(np.zeros((1,) + self._shape[1:], np.float32))

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return self._predict(x).numpy()


def embed_batch(model, pixels: Sequence[np.ndarray], input_spec: dict) -> np.ndarray:
    """Embeddings float32 (n, dim) of decoded images `pixels` (each uint8 (H, W, C)) with `model` (a
    CompiledEncoder or a Keras model)."""
    if not len(pixels):
        raise ValueError("empty batch")
    return _predict(model, to_model_input(pixels, input_spec))


def embed_array(model, pixels: np.ndarray, input_spec: dict) -> np.ndarray:
    """Embeddings float32 (n, dim) of uint8 images `pixels` (n, H, W, C) (n >= 1)."""
    shape = spec_shape(input_spec)
    if pixels.ndim != 4 or pixels.shape[1:] != shape or not len(pixels):
        raise ValueError(f"images of shape {pixels.shape} do not match the input spec (n,) + {shape}")
    return _predict(model, _to_value_range(pixels.astype(np.float32), input_spec))


def use_accelerator() -> str:
    """Prepare TensorFlow's GPUs, if it sees any, and say where models will run ('GPU:0, GPU:1' or 'CPU').

    TensorFlow places the model on the first GPU by itself; memory growth is switched on so that the
    several SDK processes a Dataflow worker may run (one model each) share a GPU instead of the first one
    taking all its memory. A CPU-only TensorFlow (tensorflow-cpu, the default install) reports 'CPU'.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised by an earlier model in this process: leave it
            pass
    return ", ".join(g.name.replace("/physical_device:", "") for g in gpus) or "CPU"


# The encoder kept by `kept_encoder`: ((model_dir, model_id, artifact_sha256), CompiledEncoder), or None.
_kept: tuple | None = None


def kept_encoder(handler: "EncoderModelHandler") -> "CompiledEncoder":
    """`handler.load_model()`, kept for the rest of the process and given again while the handler's artefact
    is the same one (its model_dir, and its card's model_id and file hash).

    For runs in one process that embed a few items each (the nightly service's nights): loading, checking
    and tracing the encoder costs ~0.25 s each time, a fifth of such a night. An artefact replaced in place
    has another card, so it is loaded anew. One encoder is kept: another artefact's replaces it.
    """
    global _kept
    key = (handler.model_dir, handler.model_id, handler.card["artifact_sha256"])
    if _kept is None or _kept[0] != key:
        _kept = None  # the old encoder goes before the new one loads
        _kept = (key, handler.load_model())
    return _kept[1]


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:2000]


class EncoderModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """Loads the encoder artefact in `model_dir` (local or gs://) and embeds uint8 (H, W, C) images.

    Each PredictionResult's `inference` is a float32 (dim,) unit vector, or an `InferenceFailure` for an
    example the model could not embed; `model_id` is the card's. The card is read when the handler is
    built (no TensorFlow needed) so the pipeline knows the input spec, embedding dim and model id up front;
    `load_model` refuses an artefact whose model id changed since.

    Batching: `min_batch_size` / `max_batch_size` go to beam.BatchElements. One model per process by
    default (each SDK process loads its own); `share_across_processes` loads one model per machine shared
    by the SDK processes (Beam's large_model) instead. The model runs on the GPU when TensorFlow sees one
    (`use_accelerator`).
    """

    def __init__(
        self,
        model_dir: str,
        *,
        min_batch_size: int = 1,
        max_batch_size: int = 256,
        share_across_processes: bool = False,
        card: Optional[dict] = None,
    ):
        from siamese_core.artefact import load_model_card

        if not 1 <= min_batch_size <= max_batch_size:
            raise ValueError(f"need 1 <= min_batch_size <= max_batch_size, got {min_batch_size}, {max_batch_size}")
        super().__init__(
            min_batch_size=min_batch_size, max_batch_size=max_batch_size, large_model=share_across_processes
        )
        self._model_dir = model_dir
        self._card = dict(card) if card is not None else load_model_card(model_dir)

    @property
    def card(self) -> dict:
        return self._card

    @property
    def model_dir(self) -> str:
        return self._model_dir

    @property
    def input_spec(self) -> dict:
        return self._card["input_spec"]

    @property
    def model_id(self) -> str:
        return self._card["model_id"]

    @property
    def embedding_dim(self) -> int:
        return int(self._card["embedding_dim"])

    def load_model(self):
        from siamese_core.artefact import load_encoder

        device = use_accelerator()
        model, card = load_encoder(self._model_dir)
        if card["model_id"] != self.model_id:
            raise ValueError(
                f"{self._model_dir}: model_id is now {card['model_id']} but the pipeline was built for "
                f"{self.model_id}; the artefact changed during the run"
            )
        encoder = CompiledEncoder(model, self.input_spec)
        encoder.warm_up()
        log.info("loaded encoder %s (%d-d) from %s on %s", self.model_id, self.embedding_dim, self._model_dir, device)
        return encoder

    def run_inference(
        self, batch: Sequence[np.ndarray], model, inference_args: Optional[dict] = None
    ) -> Iterable[PredictionResult]:
        try:
            embeddings = embed_batch(model, batch, self.input_spec)
            return [PredictionResult(x, e, self.model_id) for x, e in zip(batch, embeddings)]
        except Exception as err:  # one bad example must not fail the others: retry one by one
            log.warning("inference failed on a batch of %d (%s); retrying item by item", len(batch), _describe(err))
        results = []
        for example in batch:
            try:
                inference = embed_batch(model, [example], self.input_spec)[0]
            except Exception as err:
                inference = InferenceFailure(_describe(err))
            results.append(PredictionResult(example, inference, self.model_id))
        return results

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return int(sum(np.asarray(x).nbytes for x in batch))

    def get_metrics_namespace(self) -> str:
        return runner.METRICS_NAMESPACE

    def __repr__(self) -> str:
        return f"EncoderModelHandler({self._model_dir!r}, model_id={self.model_id})"


class _KeyedEncoderHandler(KeyedModelHandler):
    """KeyedModelHandler whose byte count (a RunInference metric) leaves the keys out: Beam's pickles
    every batch's keys just to count them, a noticeable share of the pipeline's time on small images."""

    def get_num_bytes(self, batch) -> int:
        return self._unkeyed.get_num_bytes([example for _, example in batch])


def keyed_handler(handler: EncoderModelHandler) -> KeyedModelHandler:
    """`handler` taking (key, pixels) pairs and returning (key, PredictionResult): keys travel along."""
    return _KeyedEncoderHandler(handler)


class ImageChunk(NamedTuple):
    """A chunk of images for `EncoderChunkHandler`: `pixels` uint8 (n, H, W, C) of the input spec, and
    `key`, anything the caller needs to map the n embeddings back (it travels untouched)."""

    key: Any
    pixels: np.ndarray


class ChunkEmbeddings(NamedTuple):
    """The `inference` of a chunk's PredictionResult: `embeddings` float32 (n, dim) (rows of failed
    images are undefined) and `errors` {row: 'Type: message'} for the images that could not be embedded."""

    embeddings: np.ndarray
    errors: dict


def chunk_size(chunk: ImageChunk) -> int:
    """Images in `chunk`: its weight when RunInference batches chunks."""
    return max(1, len(chunk.pixels))


class EncoderChunkHandler(EncoderModelHandler):
    """Like EncoderModelHandler, but each example is an ImageChunk and its PredictionResult's inference a
    ChunkEmbeddings. RunInference gathers chunks until they hold up to `batch_size` images (BatchElements
    weighing each chunk by its images); `run_inference` predicts them in model batches of at most
    `batch_size`."""

    def __init__(self, model_dir: str, *, batch_size: int = 256, share_across_processes: bool = False,
                 card: Optional[dict] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # BatchElements sizes in element weights (images) when given element_size_fn: batches of up to
        # batch_size images (exactly, when chunks divide it).
        super().__init__(model_dir, min_batch_size=batch_size, max_batch_size=batch_size,
                         share_across_processes=share_across_processes, card=card)
        self.batch_size = batch_size
        self._batching_kwargs["element_size_fn"] = chunk_size

    def run_inference(self, batch: Sequence[ImageChunk], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        if not batch:  # BatchElements emits an empty batch when a chunk alone outweighs batch_size
            return []
        sizes = [len(chunk.pixels) for chunk in batch]
        pixels = np.concatenate([chunk.pixels for chunk in batch]) if len(batch) > 1 else batch[0].pixels
        embeddings = np.zeros((len(pixels), self.embedding_dim), np.float32)
        errors: dict[int, str] = {}
        for start in range(0, len(pixels), self.batch_size):
            part = pixels[start:start + self.batch_size]
            try:
                embeddings[start:start + len(part)] = embed_array(model, part, self.input_spec)
                continue
            except Exception as err:  # one bad image must not fail the others: retry one by one
                log.warning("inference failed on a batch of %d (%s); retrying image by image", len(part),
                            _describe(err))
            for i in range(len(part)):
                try:
                    embeddings[start + i] = embed_array(model, part[i:i + 1], self.input_spec)[0]
                except Exception as err:
                    errors[start + i] = _describe(err)
        results, offset = [], 0
        for chunk, n in zip(batch, sizes):
            chunk_errors = {i - offset: e for i, e in errors.items() if offset <= i < offset + n}
            results.append(PredictionResult(
                chunk, ChunkEmbeddings(embeddings[offset:offset + n], chunk_errors), self.model_id))
            offset += n
        return results

    def get_num_bytes(self, batch: Sequence[ImageChunk]) -> int:
        return int(sum(chunk.pixels.nbytes for chunk in batch))

    def __repr__(self) -> str:
        return f"EncoderChunkHandler({self._model_dir!r}, model_id={self.model_id}, batch_size={self.batch_size})"
