"""Train stage: SAE architectures (``masksae.train.sae``), the sweep trainer, checkpoints
and exports.

Public API (imported lazily so ``masksae --help`` stays fast)::

    load_sae(path, *, device="cpu") -> (sae, meta)       # native run/checkpoint dir
    Trainer(store, runs, cfg, out_dir, *, resume=False, progress=True, on_step=None).train()
    TrainConfig, SweepConfig, RunSpec, load_sweep(path)
    export_saelens(run_dir, out_dir, ...), export_dictionary_learning(run_dir, out_dir, ...)
"""

from __future__ import annotations

from masksae.lazy_exports import lazy_exports

_EXPORTS = {
    "load_sae": "masksae.train.checkpoint",
    "Trainer": "masksae.train.trainer",
    "TrainSummary": "masksae.train.trainer",
    "RunResult": "masksae.train.trainer",
    "TrainConfig": "masksae.train.config",
    "SweepConfig": "masksae.train.config",
    "RunSpec": "masksae.train.config",
    "load_sweep": "masksae.train.config",
    "export_saelens": "masksae.train.export",
    "export_dictionary_learning": "masksae.train.export",
    "train_sweep": "masksae.train.sweep",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


from masksae.callable_stage import make_callable  # noqa: E402

# masksae.train(...) runs masksae.api.train (the notebook API; see masksae.callable_stage)
make_callable(__name__)
