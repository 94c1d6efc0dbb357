"""The encoder: one tower of the Siamese/triplet network, raw pixels in, unit vector out.

Preprocessing lives inside the model so the exported artefact takes the pixels exactly as they are decoded
(float32 in the card's value range, default 0..255) and nobody has to repeat the scaling elsewhere. The
output is L2-normalised by `keras.layers.UnitNormalization`, so cosine similarity of two embeddings is
their dot product (see siamese_core.similarity). Only built-in layers are used (no Lambda), so
`keras.models.load_model(..., safe_mode=True)` loads the artefact.

Two families:
  "small_cnn"      (default) a few conv stages + a dense head; trains in minutes on a CPU.
  "mobilenet_v2", "resnet50"
                   a Keras Applications backbone (include_top=False, global average pooling) with weights
                   None, "imagenet" (downloaded by Keras; needs the internet) or a local weights file, frozen
                   up to a named layer, then the embedding head. The backbone's own preprocessing is
                   expressed with plain layers: `Resizing` to the backbone's input size, then one frozen
                   1x1 affine map (`Dense` on the channel axis) that turns grey into RGB, reorders RGB to
                   BGR where the backbone wants it, and applies its scale and mean (MobileNetV2: x/127.5 - 1;
                   ResNet50 "caffe": BGR minus the ImageNet means).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import keras
from keras import layers

# Fashion-MNIST: 28x28 grey, uint8 pixels.
DEFAULT_INPUT_SPEC = {"height": 28, "width": 28, "channels": 1, "dtype": "uint8", "value_range": [0, 255]}

BACKBONES = ("small_cnn", "mobilenet_v2", "resnet50")
# small_cnn conv padding: valid shrinks each conv's output (the Fashion-MNIST recipe); same keeps the size
# until the pooling (the photo recipes).
PADDINGS = ("valid", "same")
# small_cnn: how the last feature map becomes a vector. flatten keeps where features are (look-alike classes);
# avg / avg_max pool over positions, so a crop, a pad or a border moves little (copy detection).
POOLINGS = ("flatten", "avg", "avg_max")
# small_cnn: what the first conv sees. none: the pixels in [0, 1]; standardize: each image shifted and scaled
# to zero mean and unit variance (brightness and contrast edits vanish); grey_standardize: luminance only,
# then standardized (a grey or colour-shifted copy looks like its original by construction).
INPUT_NORMS = ("none", "standardize", "grey_standardize")
_LUMA = (0.299, 0.587, 0.114)
# Per backbone: (keras.applications constructor name, BGR channel order?, scale, per-channel offset), so that
# backbone_input[c] = scale * pixel255[c'] + offset[c] with c' the source channel (RGB or BGR order).
_PREPROCESS = {
    "mobilenet_v2": ("MobileNetV2", False, 1.0 / 127.5, (-1.0, -1.0, -1.0)),
    "resnet50": ("ResNet50", True, 1.0, (-103.939, -116.779, -123.68)),
}
# Moving-statistics momentum of batch norm trained from random weights (small_cnn, Applications with
# weights=None). Keras's default, 0.99, averages over the last ~100 steps: with about that many steps per
# epoch, validation normalises with statistics of weights long gone, and a smaller data set's embeddings
# look collapsed (BENCHMARKS.md, "Trainer", fourth session).
RANDOM_INIT_BN_MOMENTUM = 0.9
_MIN_SIZE = {"mobilenet_v2": 32, "resnet50": 32}


def build_encoder(
    input_spec: dict | None = None,
    embedding_dim: int = 64,
    *,
    filters: Sequence[int] = (32, 64),
    dense_units: int = 128,
    dropout: float = 0.1,
    batch_norm: bool = False,
    convs_per_stage: int = 1,
    padding: str = "valid",
    pooling: str = "flatten",
    input_norm: str = "none",
    thumbnail: int = 0,
    backbone: str = "small_cnn",
    weights: str | None = None,
    freeze_until: str | None = None,
    alpha: float = 1.0,
    backbone_input_size: int | None = None,
    name: str = "encoder",
) -> keras.Model:
    """Build the encoder (the small CNN is about 0.23 M parameters at the defaults).

    Args:
      input_spec: the card's input spec (height, width, channels, value_range); Fashion-MNIST by default.
      embedding_dim: length of the output unit vectors.
      filters: small_cnn: output channels of the conv stages; each stage is `convs_per_stage` 3x3 convs
        (+ BatchNormalization if batch_norm) + ReLU, then 2x2 max-pooling (28 -> 26 -> 13 -> 11 -> 5 at the
        defaults with 'valid' padding), then everything is flattened so the head sees where features are,
        not only whether they are there.
      dense_units: width of the hidden Dense layer of the head (0 = none).
      dropout: dropout before the projection (training only).
      batch_norm: BatchNormalization after each conv. Off by default: on a 2-core CPU it costs about a
        third of the training throughput and this shallow net trains well without it.
      convs_per_stage, padding: small_cnn stage shape ("same" keeps the size until the pooling).
      pooling: small_cnn: one of POOLINGS (flatten; avg = global average; avg_max = global average and
        global max, concatenated).
      input_norm: small_cnn: one of INPUT_NORMS (inside the model, so the artefact stays raw pixels in).
      thumbnail: small_cnn: > 0 adds a parameter-free branch beside the convs: the (normalised) input
        averaged down to thumbnail x thumbnail, standardised, concatenated with the pooled conv features
        before the head (the coarse layout a copy keeps under blur, JPEG, resizing; the head learns its
        weight). The input side must be a multiple of it.
      backbone: one of BACKBONES.
      weights: Applications backbones: None (random), "imagenet", or the path of a weights file of the same
        backbone (e.g. written by `backbone.save_weights("x.weights.h5")`).
      freeze_until: Applications backbones: freeze every backbone layer up to and including this named
        layer (frozen BatchNormalization layers run in inference mode). None = everything trains.
      alpha: MobileNetV2 width multiplier (0.35 makes a tiny test model).
      backbone_input_size: side the pixels are resized to before the backbone (default: the input size,
        at least 32).

    Input: float32 (batch, height, width, channels) in value_range. Output: float32 (batch, embedding_dim),
    each row of unit L2 norm.
    """
    spec = dict(DEFAULT_INPUT_SPEC if input_spec is None else input_spec)
    lo, hi = (float(v) for v in spec["value_range"])
    if hi <= lo:
        raise ValueError(f"input_spec value_range must be increasing, got {spec['value_range']}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if convs_per_stage < 1:
        raise ValueError(f"convs_per_stage must be >= 1, got {convs_per_stage}")

    height, width, channels = int(spec["height"]), int(spec["width"]), int(spec["channels"])
    inputs = keras.Input(shape=(height, width, channels), dtype="float32", name="pixels")
    if backbone == "small_cnn":
        # Map value_range to [0, 1]: x * 1/(hi-lo) - lo/(hi-lo).
        x = layers.Rescaling(1.0 / (hi - lo), offset=-lo / (hi - lo), name="rescale")(inputs)
        if thumbnail and (height % thumbnail or width % thumbnail):
            raise ValueError(f"thumbnail {thumbnail} must divide the input size {height}x{width}")
        if input_norm == "grey_standardize" and channels == 3:
            luma = layers.Dense(1, use_bias=False, trainable=False, name="luminance")
            x = luma(x)
            luma.set_weights([np.asarray(_LUMA, np.float32).reshape(3, 1)])
        if input_norm != "none":
            x = layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False, epsilon=1e-3,
                                          name="standardize")(x)
        thumb = None
        if thumbnail:
            thumb = layers.AveragePooling2D((height // thumbnail, width // thumbnail), name="thumbnail_pool")(x)
            thumb = layers.Flatten(name="thumbnail_flat")(thumb)
            thumb = layers.LayerNormalization(center=False, scale=False, epsilon=1e-3, name="thumbnail_norm")(thumb)
        for stage, f in enumerate(filters):
            for i in range(convs_per_stage):
                suffix = f"{stage}" if convs_per_stage == 1 else f"{stage}_{i}"
                x = layers.Conv2D(f, 3, padding=padding, use_bias=not batch_norm, name=f"conv{suffix}")(x)
                if batch_norm:
                    x = layers.BatchNormalization(momentum=RANDOM_INIT_BN_MOMENTUM, name=f"bn{suffix}")(x)
                x = layers.ReLU(name=f"relu{suffix}")(x)
            x = layers.MaxPooling2D(2, name=f"pool{stage}")(x)
        if pooling == "flatten":
            x = layers.Flatten(name="flatten")(x)
        elif pooling == "avg":
            x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        else:
            x = layers.Concatenate(name="avg_max_pool")([layers.GlobalAveragePooling2D(name="avg_pool")(x),
                                                         layers.GlobalMaxPooling2D(name="max_pool")(x)])
        if thumb is not None:
            x = layers.Concatenate(name="with_thumbnail")([x, thumb])
        if dense_units:
            x = layers.Dense(dense_units, activation="relu", name="head_dense")(x)
    else:
        x = _applications_features(inputs, backbone, lo, hi, channels, (height, width), weights=weights,
                                   freeze_until=freeze_until, alpha=alpha, size=backbone_input_size)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.Dense(embedding_dim, name="projection")(x)
    # float32 output even under a mixed-precision policy (the artefact's contract).
    outputs = layers.UnitNormalization(axis=-1, name="l2_normalize", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def preprocess_matrix(backbone: str, channels: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """The frozen 1x1 affine map in front of an Applications backbone: (kernel (channels, 3), bias (3,)) such
    that pixels in value_range [lo, hi] times kernel plus bias are the backbone's preprocessed RGB/BGR
    input (grey input is copied to the three channels)."""
    _, bgr, scale, offset = _PREPROCESS[backbone]
    to255 = 255.0 / (hi - lo)  # pixel255 = (x - lo) * to255
    kernel = np.zeros((channels, 3), np.float32)
    for out_c in range(3):
        src = (2 - out_c) if bgr else out_c
        kernel[0 if channels == 1 else src, out_c] = scale * to255
    bias = np.asarray(offset, np.float32) - kernel.sum(axis=0) * lo
    return kernel, bias.astype(np.float32)


def _applications_features(inputs, backbone: str, lo: float, hi: float, channels: int, hw, *, weights,
                           freeze_until, alpha, size):
    if channels not in (1, 3):
        raise ValueError(f"{backbone} needs 1 or 3 input channels, got {channels}")
    app_name = _PREPROCESS[backbone][0]
    side = int(size or max(max(hw), _MIN_SIZE[backbone]))
    x = inputs
    if tuple(hw) != (side, side):
        x = layers.Resizing(side, side, interpolation="bilinear", name="resize")(x)
    kernel, bias = preprocess_matrix(backbone, channels, lo, hi)
    pre = layers.Dense(3, name="preprocess", trainable=False)
    x = pre(x)
    pre.set_weights([kernel, bias])

    local_file = weights not in (None, "imagenet")
    kwargs = {"input_shape": (side, side, 3), "include_top": False, "pooling": "avg",
              "weights": None if local_file else weights}
    if backbone == "mobilenet_v2":
        kwargs["alpha"] = alpha
    try:
        net = getattr(keras.applications, app_name)(**kwargs)
    except Exception as err:  # download failures surface as URLError/OSError/ValueError/Exception
        if weights == "imagenet":
            raise RuntimeError(f"could not get the ImageNet weights of {app_name} ({err}); without internet "
                               f"pass --weights PATH to a local weights file or --weights none") from err
        raise
    if local_file:
        net.load_weights(weights)
    if weights is None:
        # Keras Applications use BatchNormalization momentum 0.999 (right for fine-tuning pretrained
        # statistics); from random weights the moving statistics would lag thousands of steps behind and
        # inference-mode outputs would be garbage (all images alike) for a short run.
        for layer in net.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = RANDOM_INIT_BN_MOMENTUM
    if freeze_until:
        names = [layer.name for layer in net.layers]
        if freeze_until not in names:
            raise ValueError(f"freeze_until: {app_name} has no layer {freeze_until!r} (e.g. {names[1]!r} ... "
                             f"{names[-1]!r})")
        stop = names.index(freeze_until)
        for layer in net.layers[:stop + 1]:
            layer.trainable = False
    return net(x)
