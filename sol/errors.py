"""One exception type for every user-facing failure.

The CLI catches :class:`SolError`, prints its one-line message to stderr and exits with status 2. Library code raises
it for anything a user can fix (bad config key, unknown model, missing asset package, budget out of range, policy/model
mismatch, corrupt checkpoint); everything else is a bug and keeps its traceback.
"""


class SolError(Exception):
    """A problem the user can fix; the message names it in one line."""
