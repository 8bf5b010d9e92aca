"""Residual-stream access: transformer blocks, truncated capture, and splicing.

``resid_post`` of block ``L`` is the hidden state a block returns (the residual stream after
the block's attention and MLP updates). For every supported layout it equals
``output_hidden_states[L + 1]`` of a full forward pass, except for the last block of
architectures whose final hidden state is reported *after* the final norm (Llama, Gemma,
GPT-NeoX, GPT-2 in transformers >= 4.x): there ``capture_resid_post`` returns the block output
before the final norm, i.e. the true residual stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from masksae.errors import ModelError

if TYPE_CHECKING:
    from masksae.models.loading import LoadedModel

# attribute paths (from the *ForCausalLM wrapper) to the ModuleList of blocks, per layout
_BLOCK_PATHS: tuple[tuple[str, ...], ...] = (
    ("model", "layers"),  # Llama, Gemma 2/3, Mistral, Qwen, SmolLM2
    ("gpt_neox", "layers"),  # GPT-NeoX / Pythia
    ("transformer", "h"),  # GPT-2, GPT-J
    ("model", "language_model", "layers"),  # multimodal wrappers (Gemma 3 conditional)
    ("layers",),  # a bare decoder model
    ("h",),
)


def get_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (or of its bare decoder), in order."""
    for path in _BLOCK_PATHS:
        obj: Any = model
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    raise ModelError(
        f"cannot find the transformer blocks of {type(model).__name__}: supported layouts are "
        "model.layers (Llama/Gemma), gpt_neox.layers (GPT-NeoX/Pythia) and transformer.h (GPT-2)"
    )


def validate_layer(lm: LoadedModel, layer: int) -> None:
    """Raise ModelError unless ``layer`` names a block of ``lm`` (0-based)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < lm.n_layers:
        raise ModelError(
            f"layer {layer!r} is out of range for {lm.model_id} ({lm.n_layers} blocks): "
            f"expected an integer in 0..{lm.n_layers - 1}"
        )


def _hidden_of(output: Any) -> torch.Tensor:
    """The hidden state inside a block's output (a tensor, or a tuple starting with it)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"unexpected transformer block output of type {type(output).__name__}")


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return hidden
    return (
        type(output)((hidden, *output[1:]))
        if isinstance(output, tuple)
        else [
            hidden,
            *output[1:],
        ]
    )


class _StopForward(Exception):
    """Raised by the capture hook to abandon the forward pass after the hooked block."""


def capture_resid_post(
    lm: LoadedModel,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor | None,
    layer: int,
) -> torch.Tensor:
    """Block ``layer``'s output hidden state [B, T, D]; later blocks and the LM head never run."""
    validate_layer(lm, layer)
    block = get_blocks(lm.model)[layer]
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(_hidden_of(output))
        raise _StopForward

    handle = block.register_forward_hook(hook)
    # run the decoder only (no LM head), when the wrapper exposes it
    body = getattr(lm.model, "base_model", lm.model)
    try:
        with torch.inference_mode():
            body(
                input_ids=input_ids_BT.to(lm.device),
                attention_mask=None
                if attention_mask_BT is None
                else attention_mask_BT.to(lm.device),
                use_cache=False,
            )
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ModelError(f"block {layer} of {lm.model_id} did not run during the forward pass")
    return captured[0]


@contextmanager
def splice_resid_post(
    lm: LoadedModel, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the context, block ``layer``'s output hidden state ``h_BTD`` becomes ``fn(h_BTD)``."""
    validate_layer(lm, layer)
    block = get_blocks(lm.model)[layer]

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = _hidden_of(output)
        new = fn(hidden)
        if new.shape != hidden.shape:
            raise ModelError(
                f"splice function returned shape {tuple(new.shape)}, expected {tuple(hidden.shape)}"
            )
        return _replace_hidden(output, new.to(hidden.dtype))

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
