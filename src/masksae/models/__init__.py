"""Loading causal LMs and hooking their residual stream (shared by harvest and evaluate).

>>> lm = load_model("bundled:smollm2-135m", dtype="float32", device="cpu")
>>> acts_BTD = capture_resid_post(lm, input_ids_BT, attention_mask_BT, layer=15)
>>> with splice_resid_post(lm, 15, lambda h: sae(h)):
...     logits = lm.model(input_ids_BT).logits
>>> with record_resid_post(lm, 15) as rec:            # a full pass that keeps block 15's output
...     clean = lm.model(input_ids_BT).logits
>>> with resume_after_layer(lm, 15, rec.hidden, rec.tail), splice_resid_post(lm, 15, fn):
...     spliced = lm.model(input_ids_BT).logits         # runs blocks 16.. only
"""

from masksae.models.bundled import BUNDLED, BUNDLED_PREFIX, cache_root
from masksae.models.hooks import (
    BlockOutputRecorder,
    can_resume,
    capture_resid_post,
    get_blocks,
    record_resid_post,
    resume_after_layer,
    splice_resid_post,
    validate_layer,
)
from masksae.models.loading import (
    DEFAULT_MODEL,
    OFFLINE_HINT,
    LoadedModel,
    load_model,
    model_summary,
    tokenizer_id,
)

__all__ = [
    "BUNDLED",
    "BlockOutputRecorder",
    "BUNDLED_PREFIX",
    "DEFAULT_MODEL",
    "OFFLINE_HINT",
    "LoadedModel",
    "cache_root",
    "can_resume",
    "capture_resid_post",
    "get_blocks",
    "load_model",
    "model_summary",
    "record_resid_post",
    "resume_after_layer",
    "splice_resid_post",
    "tokenizer_id",
    "validate_layer",
]
