"""Tiny random causal LMs + a tiny byte-level BPE tokenizer, saved so ``load_model(path)`` works.

For tests and quick benchmarks: no Hub, no downloads, deterministic given the seed. The
tokenizer (``TINY_VOCAB`` entries, specials ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3)
is byte-level, so any text encodes; "..." is a single token, as for real tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_VOCAB = 512
ARCHITECTURES = ("llama", "gpt_neox", "gemma2", "gemma3_text", "gpt2")
#: further layouts, exercised by the hook-equivalence test only (``model.decoder.layers`` for
#: OPT, ``transformer.h`` for GPT-J and Falcon, ``model.layers`` for the others)
MORE_ARCHITECTURES = ("opt", "qwen2", "phi3", "gptj", "mistral", "falcon")
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog... and then it runs away into the forest.
A language model reads text one token at a time, and its residual stream carries what it
knows... Sparse autoencoders decompose those activations into features that people can read.
In the beginning there was the word, and the word was split into tokens... Numbers like 1, 2,
3, 42 and 1024 appear too. Wait... what happens next? Nobody knows... The end.
Paris is the capital of France; Berlin is the capital of Germany; Rome is the capital of Italy.
"""


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = TINY_VOCAB) -> Any:
    """Train (deterministically) and save a byte-level BPE tokenizer; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAINING_TEXT] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=4096,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def tiny_config(
    architecture: str = "llama",
    *,
    vocab_size: int = TINY_VOCAB,
    n_layers: int = 3,
    d_model: int = 32,
    n_heads: int = 4,
    max_context: int = 256,
) -> Any:
    """A transformers config for a tiny model of ``architecture`` (see ARCHITECTURES)."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2
    )
    if architecture == "llama":
        return tf.LlamaConfig(
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2),
            max_position_embeddings=max_context,
            **common,
        )
    if architecture == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            max_position_embeddings=max_context,
            **common,
        )
    if architecture in ("gemma2", "gemma3_text"):
        cls = tf.Gemma2Config if architecture == "gemma2" else tf.Gemma3TextConfig
        return cls(
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2),
            head_dim=d_model // n_heads,
            max_position_embeddings=max_context,
            sliding_window=max_context,
            **common,
        )
    if architecture == "gpt2":
        return tf.GPT2Config(
            n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=max_context, **common
        )
    if architecture in ("qwen2", "mistral", "phi3"):
        cls = {"qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig, "phi3": tf.Phi3Config}
        return cls[architecture](
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2),
            max_position_embeddings=max_context,
            **common,
        )
    if architecture == "opt":
        return tf.OPTConfig(
            hidden_size=d_model,
            ffn_dim=2 * d_model,
            word_embed_proj_dim=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            max_position_embeddings=max_context,
            **common,
        )
    if architecture == "gptj":
        return tf.GPTJConfig(
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            rotary_dim=d_model // n_heads // 2,
            n_positions=max_context,
            **common,
        )
    if architecture == "falcon":
        return tf.FalconConfig(
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            max_position_embeddings=max_context,
            **common,
        )
    raise ValueError(
        f"unknown tiny architecture {architecture!r}: expected one of "
        f"{ARCHITECTURES + MORE_ARCHITECTURES}"
    )


def build_tiny_model(
    out_dir: str | Path,
    architecture: str = "llama",
    *,
    n_layers: int = 3,
    d_model: int = 32,
    max_context: int = 256,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised tiny causal LM and the tiny tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer(out)
    config = tiny_config(
        architecture,
        vocab_size=len(tokenizer),
        n_layers=n_layers,
        d_model=d_model,
        max_context=max_context,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.save_pretrained(out)
    return out
