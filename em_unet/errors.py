"""Errors that em-unet reports to users as one line, without a traceback, and its one-line warnings."""

import sys


class EmUnetError(Exception):
    """Base class: the CLI prints ``em-unet: error: <message>`` and exits with status 2."""


class ConfigError(EmUnetError, ValueError):
    """A setting (flag, TOML or config.json entry) outside its valid values."""


class DataError(EmUnetError, ValueError):
    """An image or label stack that cannot be used (missing, corrupt, wrong shape or values)."""


class ModelInputError(EmUnetError, ValueError):
    """An input the U-Net cannot take (for example a side that is not a multiple of 2**depth)."""


class DependencyError(EmUnetError, ImportError):
    """An installed dependency that cannot be imported; the message says what to run."""


def warn(message: str) -> None:
    """Tell the user, on stderr as one line, of something that went on but may not be what they want."""
    print(f"em-unet: warning: {message}", file=sys.stderr)
