"""Networks by name, their parts (encoder, decoder, head) and weight loading with a report."""

from medpretrain.models import nnunet_nets  # noqa: F401  (registers nnU-Net's networks; imports no optional package)
from medpretrain.models.loading import LoadReport, load_weights, read_state_dict
from medpretrain.models.registry import ModelSpec, build_model, get_spec, list_models, register_model

__all__ = [
    "LoadReport", "ModelSpec", "build_model", "get_spec", "list_models", "load_weights", "read_state_dict",
    "register_model",
]
