"""Where a peer keeps its state, and the optional TOML configuration file.

State (keys, ledger) lives under ``$XDG_DATA_HOME/p2pinfer`` (default ``~/.local/share/p2pinfer``),
overridable with ``--data-dir``. The model store is one per user, shared by every data dir:
``$XDG_DATA_HOME/p2pinfer/models`` whatever ``--data-dir`` says, overridable with ``$P2PINFER_MODELS_DIR`` or
the config file's ``[models] dir``. Configuration is read from ``--config FILE``,
or else from ``$XDG_CONFIG_HOME/p2pinfer/config.toml`` when that file exists. Command-line options always win
over the file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

APP_NAME = "p2pinfer"
KEY_FILE_NAME = "peer.key"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / APP_NAME


MODELS_DIR_ENV = "P2PINFER_MODELS_DIR"


def default_models_dir() -> Path:
    """The user's model store: ``$P2PINFER_MODELS_DIR``, else ``$XDG_DATA_HOME/p2pinfer/models``."""
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return default_data_dir() / "models"


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / APP_NAME / "config.toml"


@dataclass(frozen=True)
class Config:
    """Settings shared by the CLI and the SDK. Unknown keys in the file are an error, to catch typos."""

    data_dir: Path = field(default_factory=default_data_dir)
    bootstrap: tuple[str, ...] = ()
    listen: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()  # public addresses to announce (e.g. a bootstrap node's DNS name)
    log_json: bool = False
    log_level: str = "info"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key_file(self) -> Path:
        return self.data_dir / KEY_FILE_NAME

    @property
    def models_dir(self) -> Path:
        """One store per user, not per data dir: every peer of this user shares imports and calibrations."""
        if os.environ.get(MODELS_DIR_ENV):
            return default_models_dir()
        section = self.extra.get("models")
        if isinstance(section, dict) and isinstance(section.get("dir"), str) and section["dir"].strip():
            return Path(section["dir"]).expanduser()
        return default_models_dir()


_TOP_LEVEL_KEYS = {"data_dir", "bootstrap", "listen", "announce", "log_json", "log_level"}
# Sections that later parts of p2pinfer read for themselves (e.g. [peer], [gateway]).
_SECTION_KEYS = {"peer", "client", "gateway", "bootstrap_node", "models", "ledger", "relay"}


def load_config(path: Path | None = None, *, data_dir: Path | None = None) -> Config:
    """Load configuration from ``path`` (which must exist) or from the default location (if it exists)."""
    explicit = path is not None
    path = path or default_config_path()
    raw: dict[str, Any] = {}
    if explicit or path.exists():
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; create it or drop --config") from None
        except PermissionError:
            raise ConfigError(f"config file {path} is not readable; check its permissions") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = set(raw) - _TOP_LEVEL_KEYS - _SECTION_KEYS
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(sorted(unknown))}")

    def _strings(key: str) -> tuple[str, ...]:
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config file {path}: {key} must be a list of strings")
        return tuple(value)

    file_data_dir = raw.get("data_dir")
    if file_data_dir is not None and not isinstance(file_data_dir, str):
        raise ConfigError(f"config file {path}: data_dir must be a string")
    resolved_dir = data_dir or (Path(file_data_dir).expanduser() if file_data_dir else default_data_dir())
    log_json = raw.get("log_json", False)
    log_level = raw.get("log_level", "info")
    if not isinstance(log_json, bool):
        raise ConfigError(f"config file {path}: log_json must be true or false")
    if not isinstance(log_level, str):
        raise ConfigError(f"config file {path}: log_level must be a string")
    return Config(
        data_dir=resolved_dir,
        bootstrap=_strings("bootstrap"),
        listen=_strings("listen"),
        announce=_strings("announce"),
        log_json=log_json,
        log_level=log_level,
        extra={k: v for k, v in raw.items() if k in _SECTION_KEYS},
    )
