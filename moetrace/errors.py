"""The one exception hierarchy of moetrace.

Every error a user can cause derives from :class:`MoetraceError`; its message names the value,
the rule it broke and the valid choices. The command line prints such errors as one line and
exits with status 2. :class:`InternalError` marks a bug in moetrace itself.
"""


class MoetraceError(Exception):
    """Bad input or a state the user can fix; the message says what and how."""


class InternalError(RuntimeError):
    """A broken invariant inside moetrace: a bug to report, not a user error."""
