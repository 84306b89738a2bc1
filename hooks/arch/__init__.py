"""Model families: one architecture per file, found through the registry (see :mod:`.registry`).

Adding a family is adding one file that defines ``FAMILY = Family(...)``: in this package it is
found on the first lookup; elsewhere it is named in ``MOETRACE_FAMILIES`` or loaded with
:func:`load_family_file`. Sources, the executor, weight derivation, recipes, the GGUF writer
and the audit look families up here (``by_model_type``, ``by_gguf_arch``, ``family_of``) and
read sizes through them (``family.n_experts(config)``, ``family.top_k(config)``, ...).
"""

from moetrace.hooks.arch.family import ConfigKeys, ExpertFusion, Family, Router, Sites
from moetrace.hooks.arch.registry import (
    ENV_VAR, by_gguf_arch, by_model_type, by_name, families, family_of, load_family_file, register, supported,
    unregister,
)

__all__ = [
    "ConfigKeys", "ExpertFusion", "Family", "Router", "Sites", "ENV_VAR", "by_gguf_arch", "by_model_type", "by_name",
    "families", "family_of", "load_family_file", "register", "supported", "unregister",
]
