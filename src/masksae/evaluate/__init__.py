"""Evaluate stage: score SAE checkpoints and write the comparison report.

Modules (one concern each):
- ``core``: reconstruction metrics on activation tensors (L0, MSE, both explained
  variances, cosine, relative norm, dead latents, feature density).
- ``downstream``: CE loss recovered and KL with the reconstruction spliced into the LLM.
- ``data`` / ``texts``: held-out evaluation activations and their on-disk cache.
- ``absorption``: SAEBench first-letter feature absorption.
- ``runner``: evaluate checkpoints into result JSON (``schema``); ``discover`` finds them.
- ``report``: the comparison report (package): tables with intervals over seeds, paired
  masked-vs-unmasked differences, CSV/LaTeX, PNG figures, from result files only.
- ``commands``: ``masksae evaluate`` and ``masksae report``.
"""

from masksae.callable_stage import make_callable  # noqa: E402

# masksae.evaluate(...) runs masksae.api.evaluate (the notebook API; see masksae.callable_stage)
make_callable(__name__)
