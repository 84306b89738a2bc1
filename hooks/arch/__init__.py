"""Model families: one architecture per file, found through the registry (see :mod:`.registry`)."""

from moetrace.hooks.arch.family import ConfigKeys, ExpertFusion, Family, Router, Sites
from moetrace.hooks.arch.registry import (
    ENV_VAR, by_gguf_arch, by_model_type, by_name, families, family_of, load_family_file, register, supported,
    unregister,
)

__all__ = [
    "ConfigKeys", "ExpertFusion", "Family", "Router", "Sites", "ENV_VAR", "by_gguf_arch", "by_model_type", "by_name",
    "families", "family_of", "load_family_file", "register", "supported", "unregister",
]
