"""Loading causal LMs and hooking their residual stream (shared by harvest and evaluate).

>>> lm = load_model("bundled:smollm2-135m", dtype="float32", device="cpu")
>>> acts_BTD = capture_resid_post(lm, input_ids_BT, attention_mask_BT, layer=15)
>>> with splice_resid_post(lm, 15, lambda h: sae(h)):
...     logits = lm.model(input_ids_BT).logits
"""

from masksae.models.bundled import BUNDLED, BUNDLED_PREFIX, cache_root
from masksae.models.hooks import (
    capture_resid_post,
    get_blocks,
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
    "BUNDLED_PREFIX",
    "DEFAULT_MODEL",
    "OFFLINE_HINT",
    "LoadedModel",
    "cache_root",
    "capture_resid_post",
    "get_blocks",
    "load_model",
    "model_summary",
    "splice_resid_post",
    "tokenizer_id",
    "validate_layer",
]
