"""The masking study end to end: one pipeline (harvest -> train -> evaluate -> report) at three
scales, driven by a StudyConfig TOML file (configs/study/): ``make demo`` (smoke run),
``make study`` (the offline CPU study) and ``make paper`` (the paper's protocol on a GPU).

>>> from masksae.study import load_study, run_study
>>> run_study(load_study("configs/study/study.toml"), "runs/study")
"""

from masksae.study.config import StoreEntry, StudyConfig, load_study, study_from_dict
from masksae.study.plan import Stage, plan_stages
from masksae.study.runner import StageFailed, run_study

__all__ = [
    "Stage",
    "StageFailed",
    "StoreEntry",
    "StudyConfig",
    "load_study",
    "plan_stages",
    "run_study",
    "study_from_dict",
]
