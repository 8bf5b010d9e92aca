"""Held-out evaluation text.

``bundled`` is the pip-installed English text (gensim's Lee news corpora) read from the
*end* backwards, while harvest reads corpora from the start, so the evaluation slice is the
part of the corpus a default-sized harvest does not reach. A path is a UTF-8 text file
(documents separated by blank lines) or a directory of ``*.txt`` files (one document each).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from masksae.errors import CorpusError

BUNDLED_FILES = ("lee_background.cor", "lee.cor")


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the bundled evaluation corpus needs the gensim package: "
                          "pip install gensim, or pass --eval-corpus PATH")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


def load_eval_texts(corpus: str) -> list[str]:
    """Documents of the evaluation corpus, held-out part first."""
    if corpus == "bundled":
        folder = _gensim_test_data()
        docs: list[str] = []
        for name in BUNDLED_FILES:
            text = (folder / name).read_text(encoding="latin-1")
            docs.extend(line.strip() for line in text.splitlines() if line.strip())
        docs.reverse()
        return docs
    path = Path(corpus)
    if path.is_dir():
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.glob("*.txt"))]
    elif path.is_file():
        raw = path.read_text(encoding="utf-8", errors="replace")
        docs = [d.strip() for d in raw.split("\n\n")]
    else:
        raise CorpusError(f"evaluation corpus {corpus!r} is neither 'bundled' nor an existing "
                          "file or directory of .txt files")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"evaluation corpus {corpus!r} holds no text")
    return docs
