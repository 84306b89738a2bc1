"""Errors of the kernels package; they derive from the project-wide MoetraceError."""

from moetrace.errors import MoetraceError


class FormatError(MoetraceError, ValueError):
    """Input that a GGUF block format cannot take (a bad shape, NaN, an unknown type)."""
