"""The README's notebook example (section "Python API (notebooks)"), run as written except
for these substitutions, which only shrink it to a tiny random model:

- model ``bundled:smollm2-135m`` -> the tiny random Llama of tests/conftest.py, layer 15 -> 1
- 4,096 harvested tokens -> 2,048; the SAE d_sae 1024 / k 20 -> 64 / 4
- 60 steps of 256 (warm-up 6, threshold start 20) -> 12 steps of 64 (warm-up 2, start 4)
- evaluation: the EvaluateConfig defaults as written (16,384 held-out tokens, 32 CE
  sequences: cheap on the tiny model)

The block runs twice, the second time with ``resume=True`` added to the train call (as the
README says a rerun needs): it reuses everything.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API (notebooks)", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section holds one python example"
    return blocks[0]


def shrink(code: str, model_dir: Path) -> str:
    subs = [
        ('"bundled:smollm2-135m"', repr(str(model_dir))),
        ("layer=15", "layer=1"),
        ("tokens=4096", "tokens=2048"),
        (
            '"d_sae": 1024, "k": 20, "threshold_start_step": 20',
            '"d_sae": 64, "k": 4, "threshold_start_step": 4',
        ),
        ("steps=60, batch_size=256, warmup_steps=6", "steps=12, batch_size=64, warmup_steps=2"),
    ]
    for old, new in subs:
        assert code.count(old) == 1, f"the README example changed: {old!r} not found once"
        code = code.replace(old, new)
    return code


def test_readme_notebook_example_runs(tmp_path, monkeypatch, tiny_model_dir):
    code = shrink(readme_block(), tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert "2048 tokens" in lines[0] and "computed now" in lines[0]
    assert lines[1].startswith("2048 tokens of width 32 at p = 0.3")
    assert re.fullmatch(
        r"L0 [\d.]+, explained variance -?[\d.]+, CE loss recovered -?[\d.]+", lines[2]
    )
    assert lines[3].startswith("torch.Size([8, 64])")
    result_file = next((tmp_path / "nb" / "results").glob("*.json"))
    first = json.loads(result_file.read_text())
    assert first["metrics"]["core"]["downstream"]["n_tokens"] > 0
    assert first["provenance"]["k"] == 4 and first["provenance"]["d_sae"] == 64

    # rerunning the cell: the store is complete, the run resumes as done, the result is reused
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("steps=12,", "steps=12, resume=True,"), "README.md", "exec"), {})
    again = out.getvalue().splitlines()
    assert "nothing to compute" in again[0]
    assert json.loads(result_file.read_text()) == first  # skipped: same settings
