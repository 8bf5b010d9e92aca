"""Shared test fixtures: offline Hugging Face settings and a tiny-model factory.

``tiny_model_factory(architecture="llama", n_layers=3, d_model=32, max_context=256, seed=0)``
returns a directory holding a randomly initialised transformers causal LM plus a matching
byte-level tokenizer (vocab 497, specials <pad> 0, <eos> 1, <bos> 2, <unk> 3; "..." is one
token), so ``masksae.models.load_model(str(path), device="cpu")`` works offline. Directories
are built once per session and cached by their arguments: treat them as read-only.
Architectures: llama, gpt_neox, gemma2, gemma3_text, gpt2.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the CLI's OpenMP defaults, before torch is imported: a shared CI box stays usable
from masksae.threads import apply_thread_env_defaults  # noqa: E402

apply_thread_env_defaults()

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Callable building (once per argument set) a tiny random model directory."""
    from masksae.models.tiny import build_tiny_model

    built: dict[tuple, Path] = {}

    def make(
        architecture: str = "llama",
        *,
        n_layers: int = 3,
        d_model: int = 32,
        max_context: int = 256,
        seed: int = 0,
    ) -> Path:
        key = (architecture, n_layers, d_model, max_context, seed)
        if key not in built:
            out = tmp_path_factory.mktemp(f"tiny-{architecture}")
            built[key] = build_tiny_model(
                out,
                architecture,
                n_layers=n_layers,
                d_model=d_model,
                max_context=max_context,
                seed=seed,
            )
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory: Callable[..., Path]) -> Path:
    """A tiny random Llama (3 blocks, d_model 32, max context 256) with its tokenizer."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def tiny_gemma_dir(tiny_model_factory: Callable[..., Path]) -> Path:
    """A tiny random Gemma 2 (needs BOS: ``prepend_bos`` is True)."""
    return tiny_model_factory("gemma2")


_WORDS = (
    "the cat sat on a mat while dogs ran far away into green hills and rivers of light "
    "under skies made from numbers like seven eleven forty two"
).split()


@pytest.fixture(scope="session")
def tiny_corpus_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deterministic 400-document jsonl corpus (field "text", ~13K tiny-tokenizer tokens)."""
    import json

    import numpy as np

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rng = np.random.default_rng(0)
    with path.open("w") as fh:
        for i in range(400):
            words = rng.choice(_WORDS, size=int(rng.integers(5, 60)))
            fh.write(
                json.dumps({"text": " ".join(words), "meta": {"set": "web" if i % 3 else "books"}})
                + "\n"
            )
    return path


@pytest.fixture
def one_thread():
    """Run the test with torch on one CPU thread (restored afterwards): the train tests use
    it (``pytestmark = pytest.mark.usefixtures("one_thread")``) for speed and determinism."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 for this test session.

    Sets the standard ``AWS_*`` variables (endpoint included) so s3fs, and subprocesses
    started by the tests, find it; yields ``{"endpoint": url, "env": {...}}``. Tests make
    their own bucket with :func:`s3_bucket`. Skipped when the dev extras are missing.
    """
    import logging

    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stderr
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield {"endpoint": env["AWS_ENDPOINT_URL"], "env": env}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the test S3 server; yields its ``s3://`` URL."""
    import re
    import uuid

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    yield f"s3://{bucket}"
