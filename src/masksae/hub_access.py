"""Fail fast when the Hugging Face Hub is unreachable.

Loading a Hub model makes a dozen requests (tokenizer files, config, weights), and
huggingface_hub retries each failed one with exponential backoff: offline, a Hub id took
about 55 s before the loader gave up. Instead, one request with a short timeout probes the
Hub first; when it fails with a network error, huggingface_hub is switched to offline mode
for the rest of the process, so the loads that follow read the local cache at once (a cached
model still loads) and an uncached one fails immediately with the offline hint.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
"""Timeout of the probe request (seconds)."""

_NETWORK_WORDS = ("Connect", "Timeout", "Network", "Offline", "Proxy", "Transport", "SSL")
_NETWORK_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ETIMEDOUT}
)


def is_network_error(exc: BaseException) -> bool:
    """True for failures to reach a server (DNS, refused, timeout, offline mode), whatever
    HTTP library raised them; False when the server answered (404, 401, ...)."""
    for cls in type(exc).__mro__:
        if any(word in cls.__name__ for word in _NETWORK_WORDS):
            return True
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_network_error(cause)


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def go_offline() -> None:
    """Offline mode for huggingface_hub (and transformers, datasets) in this process."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by libraries imported later and by subprocesses
    datasets = sys.modules.get("datasets")
    config = getattr(datasets, "config", None)
    if config is not None and hasattr(config, "HF_HUB_OFFLINE"):
        config.HF_HUB_OFFLINE = True


def probe_hub(repo_id: str, repo_type: str = "model") -> str | None:
    """One request for ``repo_id``'s info; None when the Hub answered (whatever it said) or
    offline mode is already on. On a network failure: switch to offline mode and return a
    one-line reason."""
    if hub_offline():
        return None
    from huggingface_hub import HfApi

    api = HfApi()
    info = api.dataset_info if repo_type == "dataset" else api.model_info
    try:
        info(repo_id, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - classified below
        if not is_network_error(exc):
            return None  # the Hub answered: the loader reports not-found, gated, ...
        detail = (str(exc).strip().splitlines() or [""])[0][:120]
        reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        go_offline()
        log.warning(
            "the Hugging Face Hub is unreachable (%s): offline mode for the rest of this run, "
            "only models and datasets in the local cache can load",
            reason,
        )
        return reason
    return None
