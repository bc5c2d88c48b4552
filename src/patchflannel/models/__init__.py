"""Model registry and the networks of every stage."""

from patchflannel.models.registry import get_model, list_models, model_family, register_model

__all__ = ["get_model", "list_models", "model_family", "register_model"]
