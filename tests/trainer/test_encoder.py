import numpy as np
import pytest

keras = pytest.importorskip("keras")

from trainer.encoder import build_encoder


def test_shapes_unit_norm_and_rescaling_inside():
    keras.utils.set_random_seed(1)
    model = build_encoder(embedding_dim=16, filters=(4, 8), dense_units=0, dropout=0.0)
    assert model.input_shape == (None, 28, 28, 1)
    assert model.output_shape == (None, 16)
    layer_types = {type(l).__name__ for l in model.layers}
    assert "Rescaling" in layer_types and "UnitNormalization" in layer_types
    assert "Lambda" not in layer_types
    x = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1)).astype(np.float32)
    y = model.predict(x, verbose=0)
    assert y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    # Rescaling maps 0..255 to 0..1.
    rescale = model.get_layer("rescale")
    np.testing.assert_allclose(np.asarray(rescale(np.array([[0.0, 255.0]], np.float32))), [[0.0, 1.0]],
                               atol=1e-7)


def test_stages_of_several_convs_and_batch_norm_momentum():
    from trainer.encoder import RANDOM_INIT_BN_MOMENTUM

    model = build_encoder(embedding_dim=8, filters=(4, 8), convs_per_stage=2, batch_norm=True, padding="same",
                          dense_units=0)
    convs = [l.name for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert convs == ["conv0_0", "conv0_1", "conv1_0", "conv1_1"]
    assert model.get_layer("pool1").output.shape[1:3] == (7, 7)  # 'same' keeps 28 until each pooling
    # Batch norm trained from random weights tracks its statistics over ~10 steps, not Keras's ~100:
    # otherwise a short epoch validates with stale statistics and looks collapsed.
    norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(norms) == 4 and all(l.momentum == RANDOM_INIT_BN_MOMENTUM for l in norms)
    with pytest.raises(ValueError, match="convs_per_stage"):
        build_encoder(convs_per_stage=0)


def test_other_input_spec():
    spec = {"height": 32, "width": 24, "channels": 3, "dtype": "float32", "value_range": [-1, 1]}
    model = build_encoder(spec, embedding_dim=4, filters=(4,), dense_units=8)
    assert model.input_shape == (None, 32, 24, 3)
    np.testing.assert_allclose(np.asarray(model.get_layer("rescale")(np.array([[-1.0, 1.0]], np.float32))),
                               [[0.0, 1.0]], atol=1e-7)
    with pytest.raises(ValueError):
        build_encoder({**spec, "value_range": [1, 1]})


def test_preprocess_matches_the_applications_functions():
    """The frozen 1x1 map equals keras.applications' own preprocess_input on 0..255 RGB (and grey)."""
    from trainer.encoder import preprocess_matrix
    rgb = np.random.default_rng(2).uniform(0, 255, (5, 3)).astype(np.float32)
    for backbone, module in (("mobilenet_v2", keras.applications.mobilenet_v2),
                             ("resnet50", keras.applications.resnet50)):
        kernel, bias = preprocess_matrix(backbone, 3, 0, 255)
        want = np.asarray(module.preprocess_input(rgb.copy()[None, None]))[0, 0]
        np.testing.assert_allclose(rgb @ kernel + bias, want, atol=1e-4)
        grey = rgb[:, :1]
        kernel, bias = preprocess_matrix(backbone, 1, 0, 255)
        want = np.asarray(module.preprocess_input(np.repeat(grey, 3, axis=1)[None, None]))[0, 0]
        np.testing.assert_allclose(grey @ kernel + bias, want, atol=1e-4)
    # Another value range: [-1, 1] pixels are mapped to 0..255 first.
    kernel, bias = preprocess_matrix("mobilenet_v2", 1, -1, 1)
    np.testing.assert_allclose(np.array([[-1.0], [1.0]]) @ kernel + bias, [[-1] * 3, [1] * 3], atol=1e-6)


@pytest.fixture(scope="module")
def tiny_mobilenet_weights(tmp_path_factory):
    """A local weights file: an untrained alpha-0.35 MobileNetV2 backbone saved to disk (no internet here)."""
    keras.utils.set_random_seed(7)
    net = keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False, pooling="avg", alpha=0.35,
                                         weights=None)
    path = str(tmp_path_factory.mktemp("w") / "mnv2.weights.h5")
    net.save_weights(path)
    return path, net


def test_mobilenet_backbone_local_weights_freeze_and_safe_mode(tiny_mobilenet_weights, tmp_path):
    path, net = tiny_mobilenet_weights
    model = build_encoder(embedding_dim=8, backbone="mobilenet_v2", alpha=0.35, weights=path,
                          freeze_until="block_1_project_BN")
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 8)
    assert "Lambda" not in {type(l).__name__ for l in model.layers}
    backbone = model.get_layer(net.name)
    for mine, theirs in zip(backbone.weights, net.weights):  # the file's weights were loaded
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    names = [l.name for l in backbone.layers]
    stop = names.index("block_1_project_BN")
    assert not any(l.trainable for l in backbone.layers[:stop + 1])
    assert all(l.trainable for l in backbone.layers[stop + 1:])
    assert not model.get_layer("preprocess").trainable
    x = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1)).astype(np.float32)
    y = np.asarray(model(x, training=False))
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras", safe_mode=True, compile=False)
    np.testing.assert_allclose(np.asarray(again(x, training=False)), y, atol=1e-6)
    with pytest.raises(ValueError, match="no layer"):
        build_encoder(embedding_dim=8, backbone="mobilenet_v2", alpha=0.35, freeze_until="nope")


def test_resnet50_and_bad_names():
    from trainer.encoder import _PREPROCESS
    assert _PREPROCESS["resnet50"][1]  # BGR
    model = build_encoder({"height": 32, "width": 32, "channels": 3, "value_range": [0, 255]}, embedding_dim=4,
                          backbone="resnet50", weights=None)
    assert model.output_shape == (None, 4)
    assert any(type(l).__name__ == "Functional" and l.name == "resnet50" for l in model.layers)
    with pytest.raises(ValueError, match="backbone"):
        build_encoder(backbone="vgg")


def test_grey_standardized_input_makes_grey_and_contrast_copies_embed_like_the_original():
    from trainer.encoder import build_encoder
    spec = {"height": 32, "width": 32, "channels": 3, "dtype": "uint8", "value_range": [0, 255]}
    model = build_encoder(spec, 16, filters=(8, 16), dense_units=0, dropout=0.0, padding="same",
                          pooling="avg_max", input_norm="grey_standardize", thumbnail=8)
    rng = np.random.default_rng(0)
    image = rng.integers(30, 200, (1, 32, 32, 3)).astype(np.float32)
    grey = np.repeat(image @ np.array([0.299, 0.587, 0.114], np.float32)[:, None], 3, axis=-1)
    contrast = np.clip((image - image.mean()) * 1.2 + image.mean() + 10, 0, 255)
    other = rng.integers(30, 200, (1, 32, 32, 3)).astype(np.float32)
    e = [np.asarray(model(x, training=False))[0] for x in (image, grey, contrast, other)]
    assert float(e[0] @ e[1]) > 0.9999 and float(e[0] @ e[2]) > 0.9999
    assert float(e[0] @ e[3]) < 0.999


def test_pooling_and_thumbnail_options_are_checked():
    from trainer.encoder import build_encoder
    spec = {"height": 30, "width": 30, "channels": 3, "dtype": "uint8", "value_range": [0, 255]}
    with pytest.raises(ValueError, match="pooling must be one of"):
        build_encoder(spec, 8, pooling="median")
    with pytest.raises(ValueError, match="input_norm must be one of"):
        build_encoder(spec, 8, input_norm="sepia")
    with pytest.raises(ValueError, match="must divide"):
        build_encoder(spec, 8, thumbnail=8)
