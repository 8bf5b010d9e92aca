"""Residual-stream access: transformer blocks, truncated capture, and splicing.

``resid_post`` of block ``L`` is the hidden state a block returns (the residual stream after
the block's attention and MLP updates). For every supported layout it equals
``output_hidden_states[L + 1]`` of a full forward pass, except for the last block of
architectures whose final hidden state is reported *after* the final norm (Llama, Gemma,
GPT-NeoX, GPT-2 in transformers >= 4.x): there ``capture_resid_post`` returns the block output
before the final norm, i.e. the true residual stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from masksae.errors import ModelError

if TYPE_CHECKING:
    from masksae.models.loading import LoadedModel

log = logging.getLogger(__name__)

# attribute paths (from the *ForCausalLM wrapper) to the ModuleList of blocks: fast paths for
# the layouts we know; anything else goes through the generic search of ``get_blocks``
_BLOCK_PATHS: tuple[tuple[str, ...], ...] = (
    ("model", "layers"),  # Llama, Gemma 2/3, Mistral, Qwen2, Phi-3, SmolLM2
    ("gpt_neox", "layers"),  # GPT-NeoX / Pythia
    ("transformer", "h"),  # GPT-2, GPT-J, Falcon
    ("model", "decoder", "layers"),  # OPT
    ("model", "language_model", "layers"),  # multimodal wrappers (Gemma 3 conditional)
    ("layers",),  # a bare decoder model
    ("h",),
    ("decoder", "layers"),  # a bare OPT decoder
)


def _n_hidden_layers(model: torch.nn.Module) -> int | None:
    """``num_hidden_layers`` of the model's (text) config: the blocks output_hidden_states
    counts (it reports one hidden state per block plus the embeddings)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return n if isinstance(n, int) and n > 0 else None


def _block_list_candidates(model: torch.nn.Module, n_layers: int | None) -> list[str]:
    """Names of the ModuleLists that look like the decoder's block list: ``n_layers`` entries
    (any length if unknown) of one module class, not nested in another candidate."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if n_layers is not None and len(module) != n_layers:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if any(name.startswith(prefix + ".") for prefix in found):
            continue
        found.append(name)
    return found


def get_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (or of its bare decoder), in order.

    Known layouts are looked up directly; otherwise the block list is the ``nn.ModuleList``
    of ``config.num_hidden_layers`` same-class modules (the blocks ``output_hidden_states``
    counts), provided exactly one such list exists.
    """
    n_layers = _n_hidden_layers(model)
    for path in _BLOCK_PATHS:
        obj: Any = model
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if (
            isinstance(obj, torch.nn.ModuleList)
            and len(obj) > 0
            and (n_layers is None or len(obj) == n_layers)
        ):
            return obj
    candidates = _block_list_candidates(model, n_layers)
    if len(candidates) == 1:
        found = model.get_submodule(candidates[0])
        log.debug("transformer blocks of %s found at %s", type(model).__name__, candidates[0])
        assert isinstance(found, torch.nn.ModuleList)
        return found
    expected = f"{n_layers} blocks (config.num_hidden_layers)" if n_layers else "blocks"
    where = (
        f"several module lists could be them: {', '.join(candidates)}"
        if candidates
        else "no nn.ModuleList of one block class has that length"
    )
    raise ModelError(
        f"cannot find the transformer blocks of {type(model).__name__}: looked for the "
        f"nn.ModuleList of {expected}, but {where}; known layouts are model.layers, "
        "gpt_neox.layers, transformer.h and model.decoder.layers"
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


class BlockOutputRecorder:
    """What block ``layer`` returned in a forward pass (see :func:`record_resid_post`)."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None
        """The block's output hidden state [B, T, D] (None until the block ran)."""
        self.tail: tuple[Any, ...] | None = None
        """The rest of a tuple output (None: the block returns a bare tensor)."""


@contextmanager
def record_resid_post(lm: LoadedModel, layer: int) -> Iterator[BlockOutputRecorder]:
    """Within the context, every forward pass records block ``layer``'s output (the pass
    runs to the end; see ``capture_resid_post`` to stop there)."""
    validate_layer(lm, layer)
    recorder = BlockOutputRecorder()

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        recorder.hidden = _hidden_of(output)
        recorder.tail = tuple(output[1:]) if isinstance(output, (tuple, list)) else None

    handle = get_blocks(lm.model)[layer].register_forward_hook(hook)
    try:
        yield recorder
    finally:
        handle.remove()


def can_resume(recorder: BlockOutputRecorder) -> bool:
    """True when a recorded output can stand in for the blocks (no cache tensors in a tuple
    output: those would belong to the recorded pass)."""
    tail = recorder.tail or ()
    return recorder.hidden is not None and all(not torch.is_tensor(t) for t in tail)


@contextmanager
def resume_after_layer(
    lm: LoadedModel, layer: int, hidden_BTD: torch.Tensor, tail: tuple[Any, ...] | None = None
) -> Iterator[None]:
    """Within the context a forward pass skips blocks 0..``layer``: block ``layer`` returns
    ``hidden_BTD`` (its output recorded by :func:`record_resid_post` on *the same inputs*) and
    the blocks before it pass their input through unchanged, so only the later blocks, the
    final norm and the LM head compute. Forward hooks on block ``layer`` (a splice) still
    apply. Embeddings, masks and position tables are still built by the model's own code."""
    validate_layer(lm, layer)
    blocks = get_blocks(lm.model)

    def wrap(hidden: torch.Tensor) -> Any:
        return hidden if tail is None else (hidden, *tail)

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return wrap(args[0] if args else kwargs["hidden_states"])

    def recorded(*args: Any, **kwargs: Any) -> Any:
        like = args[0] if args else kwargs["hidden_states"]
        return wrap(hidden_BTD.to(device=like.device, dtype=like.dtype))

    saved = [block.__dict__.get("forward") for block in blocks[: layer + 1]]
    for i, block in enumerate(blocks[: layer + 1]):
        block.forward = recorded if i == layer else passthrough  # instance attribute wins
    try:
        yield
    finally:
        for block, previous in zip(blocks[: layer + 1], saved, strict=True):
            if previous is None:
                del block.forward
            else:
                block.forward = previous
