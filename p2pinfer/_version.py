"""The installed version of p2pinfer (imported first by the package, so every module may use it)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("p2pinfer")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
