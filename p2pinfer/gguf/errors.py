"""Errors raised while importing a GGUF file. All of them are user-facing (:class:`P2PInferError`)."""

from __future__ import annotations

from ..errors import P2PInferError


class GGUFImportError(P2PInferError):
    """A GGUF file could not be imported (unreadable, inconsistent, or the output folder is unusable)."""


class UnsupportedArchitectureError(GGUFImportError):
    """The GGUF's ``general.architecture`` (or one of its features) is not one the importer can convert."""


class UnsupportedTensorTypeError(GGUFImportError):
    """A tensor is stored in a GGML type the importer cannot dequantize."""


class UnsupportedTokenizerError(GGUFImportError):
    """The GGUF's tokenizer metadata describes a tokenizer the importer cannot rebuild."""


class DefaultModelMissingError(P2PInferError):
    """The package that carries the default model's GGUF file is not installed."""
