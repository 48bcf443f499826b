"""Networks by name, their parts (encoder, decoder, head) and weight loading with a report."""

from medpretrain.models.loading import LoadReport, load_weights, read_state_dict
from medpretrain.models.registry import ModelSpec, build_model, get_spec, list_models, register_model

__all__ = [
    "LoadReport", "ModelSpec", "build_model", "get_spec", "list_models", "load_weights", "read_state_dict",
    "register_model",
]
