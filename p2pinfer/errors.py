"""The exception hierarchy every part of p2pinfer raises from.

`P2PInferError` is what a user may see: its message says what was wrong and what to do. The CLI prints
it on one line, without a traceback.
"""


class P2PInferError(Exception):
    """Base class for errors whose message is meant for the user."""


class ConfigError(P2PInferError):
    """A configuration file or option is missing, unreadable or malformed."""


class KeyFileError(P2PInferError):
    """A peer key file is missing, unreadable, malformed or too widely readable."""
