"""Downstream metrics: CE loss recovered and KL when the SAE reconstruction is spliced in.

The reconstruction replaces the residual stream after block ``layer`` (through
``masksae.models.splice_resid_post``) at every *kept* position: real tokens that are not
special tokens and not position 0 (BOS / attention-sink activations are left untouched,
as in training, where they are excluded). The zero-ablation baseline writes zeros at the
same positions. A next-token prediction at position t counts toward the losses only when
both t and t + 1 are kept positions.

    ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    kl_div_sae        = mean over counted positions of KL(p_clean || p_sae)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from masksae.errors import ConfigError
from masksae.evaluate.config import DownstreamConfig
from masksae.evaluate.core import SAELike

log = logging.getLogger(__name__)


class CleanCache:
    """The clean forward's results per batch, kept in memory within a byte budget: the
    log-probs, and the hooked block's output (the residual stream at the SAE's layer).

    One instance serves one evaluation set and layer (the caller keys instances by data);
    batches are stored in the order they are first computed until the budget is full. The
    residual (B x T x D) is stored before the log-probs (B x T x V, ~85x larger for
    SmolLM2), so it is kept for every batch long after the log-probs stop fitting.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._batches: dict[int, Tensor] = {}
        self._resid: dict[int, tuple[Tensor, tuple[Any, ...] | None]] = {}
        self._full_logged = False

    def get(self, start: int) -> Tensor | None:
        """Log-probs [B, T, V] of the batch starting at sequence ``start``, if kept."""
        return self._batches.get(start)

    def get_resid(self, start: int) -> tuple[Tensor, tuple[Any, ...] | None] | None:
        """(block output hidden [B, T, D], tuple tail) of the batch at ``start``, if kept."""
        return self._resid.get(start)

    def put_resid(self, start: int, hidden_BTD: Tensor, tail: tuple[Any, ...] | None) -> None:
        """Keep a CPU copy of the hooked block's output if it fits the budget."""
        size = hidden_BTD.numel() * hidden_BTD.element_size()
        if start in self._resid or self.used_bytes + size > self.budget_bytes:
            return
        self._resid[start] = (hidden_BTD.detach().to("cpu").clone(), tail)
        self.used_bytes += size

    def put(self, start: int, lp_BTV: Tensor) -> None:
        """Keep a CPU float32 copy of ``lp_BTV`` if it fits the budget."""
        size = lp_BTV.numel() * 4
        if start in self._batches:
            return
        if self.used_bytes + size > self.budget_bytes:
            if not self._full_logged:
                log.info(
                    "clean log-prob cache full (%.0f of %.0f MiB): later batches re-run "
                    "the clean forward",
                    self.used_bytes / 2**20,
                    self.budget_bytes / 2**20,
                )
                self._full_logged = True
            return
        self._batches[start] = lp_BTV.detach().to("cpu", torch.float32).clone()
        self.used_bytes += size


def keep_positions(
    input_ids_BT: Tensor, attention_mask_BT: Tensor, special_ids: Iterable[int]
) -> Tensor:
    """Bool [B, T]: real, non-special tokens after position 0 (the positions an SAE sees)."""
    keep = attention_mask_BT.bool().clone()
    keep[:, 0] = False
    specials = torch.tensor(
        sorted(set(special_ids)), dtype=input_ids_BT.dtype, device=input_ids_BT.device
    )
    if specials.numel():
        keep &= ~torch.isin(input_ids_BT, specials)
    return keep


def _splice_fn(keep_BT: Tensor, replace: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """fn(h) that swaps in replace(h) at kept positions and leaves the rest untouched."""

    def fn(h_BTD: Tensor) -> Tensor:
        new = replace(h_BTD.to(torch.float32)).to(h_BTD.dtype)
        return torch.where(keep_BT.unsqueeze(-1).to(h_BTD.device), new, h_BTD)

    return fn


def _logprobs(lm: Any, ids_BT: Tensor, attn_BT: Tensor) -> Tensor:
    # no KV cache: a pass that resumes after a layer must not depend on the skipped blocks'
    # cache entries
    out = lm.model(
        input_ids=ids_BT.to(lm.device), attention_mask=attn_BT.to(lm.device), use_cache=False
    )
    return F.log_softmax(out.logits.float(), dim=-1)


def _nll(lp_BTV: Tensor, target_BT: Tensor, count_BT: Tensor) -> float:
    """Summed next-token NLL over counted positions (target_BT = ids[:, 1:])."""
    tok = -lp_BTV[:, :-1].gather(-1, target_BT.unsqueeze(-1)).squeeze(-1)
    return float((tok * count_BT).sum())


def _kl(lp_p: Tensor, lp_q: Tensor, count_BT: Tensor) -> float:
    """Summed KL(p || q) over counted positions."""
    per_tok = (lp_p.exp() * (lp_p - lp_q)).sum(-1)[:, :-1]
    return float((per_tok * count_BT).sum())


@dataclass
class _Sums:
    ce_clean: float = 0.0
    ce_sae: float = 0.0
    ce_zero: float = 0.0
    kl_sae: float = 0.0
    kl_zero: float = 0.0
    n: int = 0


@torch.no_grad()
def downstream_metrics(
    lm: Any,
    sae: SAELike,
    layer: int,
    input_ids_ST: Tensor,
    attention_mask_ST: Tensor,
    keep_ST: Tensor,
    cfg: DownstreamConfig | None = None,
    *,
    baseline: dict[str, float] | None = None,
    clean_cache: CleanCache | None = None,
) -> dict[str, Any]:
    """CE loss recovered and KL of ``sae`` spliced into ``lm`` (a ``masksae.models.LoadedModel``).

    ``baseline`` (the ``baseline`` entry of an earlier result on the same sequences) skips
    the zero-ablation forward pass, which does not depend on the SAE. ``clean_cache`` (one
    per evaluation set, reused across checkpoints) keeps the clean forward's log-probs so a
    later call skips that forward for the batches it holds.
    """
    from masksae.models import (
        can_resume,
        capture_resid_post,
        record_resid_post,
        resume_after_layer,
        splice_resid_post,
    )

    cfg = cfg or DownstreamConfig()
    n_seq = min(cfg.n_sequences, input_ids_ST.shape[0])
    if n_seq == 0:
        raise ConfigError("downstream metrics need at least one evaluation sequence, got 0")
    sums = _Sums()
    need_zero = baseline is None
    n_clean_cached = n_resumed = 0

    def reconstruct(h_BTD: Tensor) -> Tensor:
        shape = h_BTD.shape
        flat = h_BTD.reshape(-1, shape[-1])
        return sae.decode(sae.encode(flat)).reshape(shape)

    from masksae.progress import progress_bar

    bar = progress_bar(n_seq, "CE/KL (LLM splice)", "seq")
    for start in range(0, n_seq, cfg.batch_size):
        ids = input_ids_ST[start : min(start + cfg.batch_size, n_seq)]
        bar.update(ids.shape[0])
        attn = attention_mask_ST[start : start + ids.shape[0]]
        keep = keep_ST[start : start + ids.shape[0]].to(lm.device)
        # predictions at t whose source and target positions are both kept
        count_BT = (keep[:, :-1] & keep[:, 1:]).float()
        n = int(count_BT.sum())
        if n == 0:
            continue
        target = ids[:, 1:].to(lm.device)

        clean = clean_cache.get(start) if clean_cache is not None else None
        resid = clean_cache.get_resid(start) if clean_cache is not None else None
        if clean is not None:
            clean = clean.to(lm.device)
            n_clean_cached += ids.shape[0]
            if resid is None:  # the residual alone: blocks 0..layer only
                with record_resid_post(lm, layer) as rec:
                    capture_resid_post(lm, ids, attn, layer)
                resid = (rec.hidden, rec.tail) if can_resume(rec) else None
        else:
            with record_resid_post(lm, layer) as rec:
                clean = _logprobs(lm, ids, attn)
            if can_resume(rec):
                assert rec.hidden is not None
                resid = (rec.hidden, rec.tail)
            if clean_cache is not None:
                if resid is not None:
                    clean_cache.put_resid(start, *resid)
                clean_cache.put(start, clean)

        def resumed(resid: tuple[Tensor, Any] | None = resid) -> Any:
            # the spliced and zero-ablated passes differ from the clean one only after the
            # hooked block: start them there from its recorded output
            if resid is None:
                return nullcontext()
            return resume_after_layer(lm, layer, resid[0], resid[1])

        if resid is not None:
            n_resumed += ids.shape[0]
        with resumed(), splice_resid_post(lm, layer, _splice_fn(keep, reconstruct)):
            spliced = _logprobs(lm, ids, attn)
        sums.ce_clean += _nll(clean, target, count_BT)
        sums.ce_sae += _nll(spliced, target, count_BT)
        sums.kl_sae += _kl(clean, spliced, count_BT)
        del spliced
        if need_zero:
            with resumed(), splice_resid_post(lm, layer, _splice_fn(keep, torch.zeros_like)):
                zero = _logprobs(lm, ids, attn)
            sums.ce_zero += _nll(zero, target, count_BT)
            sums.kl_zero += _kl(clean, zero, count_BT)
            del zero
        sums.n += n
    bar.close()

    if sums.n == 0:
        raise ConfigError(
            "no scorable positions in the downstream evaluation sequences "
            "(all tokens are special or position 0): use longer sequences"
        )
    ce_clean = sums.ce_clean / sums.n
    ce_sae = sums.ce_sae / sums.n
    kl_sae = sums.kl_sae / sums.n
    if need_zero:
        baseline = {"ce_loss_zero": sums.ce_zero / sums.n, "kl_div_zero": sums.kl_zero / sums.n}
    assert baseline is not None
    ce_zero = baseline["ce_loss_zero"]
    kl_zero = baseline["kl_div_zero"]
    denom = ce_zero - ce_clean
    return {
        "n_tokens": sums.n,
        "ce_loss_clean": ce_clean,
        "ce_loss_sae": ce_sae,
        "ce_loss_zero": ce_zero,
        "ce_loss_recovered": (ce_zero - ce_sae) / denom if denom != 0 else float("nan"),
        "kl_div_sae": kl_sae,
        "kl_div_zero": kl_zero,
        "kl_div_score": (kl_zero - kl_sae) / kl_zero if kl_zero != 0 else float("nan"),
        "baseline": {"ce_loss_zero": ce_zero, "kl_div_zero": kl_zero},
        "clean_forward_cached_sequences": n_clean_cached,
        "resumed_after_layer_sequences": n_resumed,
    }
