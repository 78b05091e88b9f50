"""Model access on any HuggingFace causal LM: module lookup by template, hooks, token indexing."""

from .fingerprint import model_fingerprint, tensor_fingerprint
from .hooks import Capture, StopForward, forward_until, inject_at_layer
from .locate import EditTarget, Locate, edit_targets, get_module, layer_count, model_device
from .tokens import continuation_ids, encode_prompts, padded_batch, subject_spans, subject_token_ranges

__all__ = [
    "Capture",
    "EditTarget",
    "Locate",
    "StopForward",
    "continuation_ids",
    "edit_targets",
    "encode_prompts",
    "forward_until",
    "get_module",
    "inject_at_layer",
    "layer_count",
    "model_device",
    "model_fingerprint",
    "padded_batch",
    "subject_spans",
    "subject_token_ranges",
    "tensor_fingerprint",
]
