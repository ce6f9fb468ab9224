"""Model runtime: ONNX causal LMs on onnxruntime, seeded sampling, logit fingerprints and their verification.

See docs/models.md for the formats, the digest, numeric classes and the verification rule.
"""

from .calibrate import CalibrationResult, calibrate, ensure_tolerance, tolerance_from_drift
from .chat import FALLBACK_TEMPLATE, ChatTemplateError, render_chat
from .digest import ModelFormatError, compute_digest
from .fingerprint import (
    FORMAT as FINGERPRINT_FORMAT,
    Fingerprint,
    FingerprintVerdict,
    bytes_per_token,
    commitment,
    pack,
    unpack,
    verify_fingerprint,
)
from .generate import GeneratedToken, Generation, GenerationResult, TokenStream, generate
from .model import (
    LoadedModel,
    ModelLayoutError,
    ModelNotCalibratedError,
    create_session,
    default_providers,
    load_model,
)
from .sampling import GREEDY, SamplingParams, is_acceptable, sample, sampling_seed
from .store import ModelNotFoundError, ModelRecord, ModelStore, resolve_models
from .verify import check_finish, verify_result

__all__ = [
    "CalibrationResult", "calibrate", "ensure_tolerance", "tolerance_from_drift",
    "FALLBACK_TEMPLATE", "ChatTemplateError", "render_chat",
    "ModelFormatError", "compute_digest",
    "FINGERPRINT_FORMAT", "Fingerprint", "FingerprintVerdict", "bytes_per_token", "commitment", "pack", "unpack",
    "verify_fingerprint",
    "GeneratedToken", "Generation", "GenerationResult", "TokenStream", "generate",
    "LoadedModel", "ModelLayoutError", "ModelNotCalibratedError", "create_session", "default_providers", "load_model",
    "GREEDY", "SamplingParams", "is_acceptable", "sample", "sampling_seed",
    "ModelNotFoundError", "ModelRecord", "ModelStore", "resolve_models",
    "check_finish", "verify_result",
]
