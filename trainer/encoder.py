"""The encoder: one tower of the Siamese/triplet network, raw pixels in, unit vector out.

Preprocessing lives inside the model (a `Rescaling` layer) so the exported artefact takes the pixels exactly
as they are decoded (float32 in the card's value range, default 0..255) and nobody has to repeat the
scaling elsewhere. The output is L2-normalised by `keras.layers.UnitNormalization`, so cosine similarity of
two embeddings is their dot product (see trainer.distances). Only built-in layers are used (no Lambda), so
`keras.models.load_model(..., safe_mode=True)` loads the artefact.
"""
from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

# Fashion-MNIST: 28x28 grey, uint8 pixels.
DEFAULT_INPUT_SPEC = {"height": 28, "width": 28, "channels": 1, "dtype": "uint8", "value_range": [0, 255]}


def build_encoder(
    input_spec: dict | None = None,
    embedding_dim: int = 64,
    *,
    filters: Sequence[int] = (32, 64),
    dense_units: int = 128,
    dropout: float = 0.1,
    batch_norm: bool = False,
    name: str = "encoder",
) -> keras.Model:
    """A small, fast CNN encoder (about 0.23 M parameters at the defaults).

    Args:
      input_spec: the card's input spec (height, width, channels, value_range); Fashion-MNIST by default.
      embedding_dim: length of the output unit vectors.
      filters: output channels of the conv stages; each stage is a 3x3 'valid' conv + ReLU and 2x2
        max-pooling (28 -> 26 -> 13 -> 11 -> 5 at the defaults), then everything is flattened so the head
        sees where features are, not only whether they are there.
      dense_units: width of the hidden Dense layer of the head (0 = none).
      dropout: dropout before the projection (training only).
      batch_norm: BatchNormalization after each conv. Off by default: on a 2-core CPU it costs about a
        third of the training throughput and this shallow net trains well without it.

    Input: float32 (batch, height, width, channels) in value_range. Output: float32 (batch, embedding_dim),
    each row of unit L2 norm.
    """
    spec = dict(DEFAULT_INPUT_SPEC if input_spec is None else input_spec)
    lo, hi = (float(v) for v in spec["value_range"])
    if hi <= lo:
        raise ValueError(f"input_spec value_range must be increasing, got {spec['value_range']}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")

    inputs = keras.Input(shape=(int(spec["height"]), int(spec["width"]), int(spec["channels"])),
                         dtype="float32", name="pixels")
    # Map value_range to [0, 1]: x * 1/(hi-lo) - lo/(hi-lo).
    x = layers.Rescaling(1.0 / (hi - lo), offset=-lo / (hi - lo), name="rescale")(inputs)
    for stage, f in enumerate(filters):
        x = layers.Conv2D(f, 3, use_bias=not batch_norm, name=f"conv{stage}")(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"bn{stage}")(x)
        x = layers.ReLU(name=f"relu{stage}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{stage}")(x)
    x = layers.Flatten(name="flatten")(x)
    if dense_units:
        x = layers.Dense(dense_units, activation="relu", name="head_dense")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.Dense(embedding_dim, name="projection")(x)
    outputs = layers.UnitNormalization(axis=-1, name="l2_normalize")(x)
    return keras.Model(inputs, outputs, name=name)
