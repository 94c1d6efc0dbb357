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


def test_other_input_spec():
    spec = {"height": 32, "width": 24, "channels": 3, "dtype": "float32", "value_range": [-1, 1]}
    model = build_encoder(spec, embedding_dim=4, filters=(4,), dense_units=8)
    assert model.input_shape == (None, 32, 24, 3)
    np.testing.assert_allclose(np.asarray(model.get_layer("rescale")(np.array([[-1.0, 1.0]], np.float32))),
                               [[0.0, 1.0]], atol=1e-7)
    with pytest.raises(ValueError):
        build_encoder({**spec, "value_range": [1, 1]})
