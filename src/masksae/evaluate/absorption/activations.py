"""LLM residual-stream activations at the query word of each prompt, batched."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from masksae.evaluate.absorption.prompts import BosPolicy, Prompt, tokenize_prompt

logger = logging.getLogger(__name__)


def _capture(lm, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, layer: int):
    """`masksae.models.capture_resid_post`, or the equivalent hidden state while that module
    is not installed."""
    try:
        from masksae.models import capture_resid_post
    except ImportError:
        out = lm.model(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, output_hidden_states=True
        )
        return out.hidden_states[layer + 1]
    return capture_resid_post(lm, input_ids_BT, attention_mask_BT, layer)


def encode_prompts(tokenizer, prompts: Sequence[Prompt], bos: BosPolicy) -> list[list[int]]:
    """Each prompt's token ids up to and including the query word's last token.

    The tokens after the word (" has the first letter:") cannot change the activation at the
    word in a causal LM, so they are never run: the same activations for ~7 % less compute.
    """
    out = []
    for prompt in prompts:
        ids, position = tokenize_prompt(tokenizer, prompt, bos)
        out.append(ids[: position + 1])
    return out


@torch.inference_mode()
def word_activations(
    lm, prompts: Sequence[Prompt], layer: int, batch_size: int, bos: BosPolicy, progress=None
) -> torch.Tensor:
    """Float32 CPU tensor [N, D]: block `layer`'s output at each prompt's word token.

    Prompts are sorted by token length so batches carry little padding (right padding with
    an attention mask); the result is in the order of `prompts`. `progress` (a tqdm bar or
    None) is advanced by the number of prompts done.
    """
    tokenizer = lm.tokenizer
    encoded = encode_prompts(tokenizer, prompts, bos)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    device = torch.device(getattr(lm, "device", "cpu"))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    rows: list[torch.Tensor | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids_BT = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = encoded[i]
            ids_BT[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask_BT[row, : len(ids)] = 1
        h_BTD = _capture(lm, ids_BT.to(device), mask_BT.to(device), layer)
        positions = torch.tensor([len(encoded[i]) - 1 for i in batch], device=h_BTD.device)
        picked_BD = h_BTD[torch.arange(len(batch), device=h_BTD.device), positions]
        picked_BD = picked_BD.float().cpu()
        for row, i in enumerate(batch):
            rows[i] = picked_BD[row]
        if progress is not None:
            progress.update(len(batch))
    if not rows:
        d_model = int(getattr(lm, "d_model", 0) or lm.model.config.hidden_size)
        return torch.zeros((0, d_model))
    return torch.stack(rows)  # type: ignore[arg-type]
