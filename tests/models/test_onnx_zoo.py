"""Loaders for the light models shipped with the onnx wheel."""

import numpy as np
import pytest

import ir
from models.onnx_zoo import LIGHT_MODELS, light_model_path, light_model_reference


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_loads_with_static_shapes(name):
    path = light_model_path(name)
    assert path.is_file()
    model = ir.load_model(path)
    assert model.graph.inputs and all(ir.is_static_shape(v.shape) for v in model.graph.inputs)
    reference = light_model_reference(name)
    assert reference.shape[:2] == (1, 1000)
    assert np.isfinite(reference).all()


def test_unknown_light_model_is_a_clear_error():
    with pytest.raises(KeyError, match="known: resnet50"):
        light_model_path("mobilenet")
