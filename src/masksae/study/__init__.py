"""The masking study end to end: one pipeline (harvest -> train -> evaluate -> report) at three
scales, driven by a StudyConfig TOML file (configs/study/): ``make demo`` (smoke run),
``make study`` (the offline CPU study) and ``make paper`` (the paper's protocol on a GPU).

>>> from masksae.study import load_study, run_study
>>> run_study(load_study("configs/study/study.toml"), "runs/study")
"""

from __future__ import annotations

from masksae.lazy_exports import lazy_exports

# imported on first use (PEP 562) so ``masksae --help`` does not import torch or zarr
_EXPORTS = {
    "StoreEntry": "masksae.study.config",
    "StudyConfig": "masksae.study.config",
    "load_study": "masksae.study.config",
    "study_from_dict": "masksae.study.config",
    "Stage": "masksae.study.plan",
    "plan_stages": "masksae.study.plan",
    "StageFailed": "masksae.study.runner",
    "run_study": "masksae.study.runner",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
