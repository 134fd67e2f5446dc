"""Model implementations, one file per family, found through the registry."""

from fastgen.models.registry import MODEL_REGISTRY, get_model_class

__all__ = ["MODEL_REGISTRY", "get_model_class"]
