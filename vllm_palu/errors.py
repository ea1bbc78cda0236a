class PaluError(Exception):
    """A user-facing error: the CLIs print its message on one line and exit non-zero."""
