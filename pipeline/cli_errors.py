"""The one exception type the CLI turns into a single line and exit status 2."""


class UsageError(Exception):
    """A mistake in the command line or its inputs that the user can fix."""
