"""The SAE contract: base config, step I/O tuples and the ``SparseAutoencoder`` module.

Every architecture subclasses :class:`SAEConfig` (adding its own documented fields; the
configs live in the torch-free ``masksae.train.sae_config``, re-exported here) and
:class:`SparseAutoencoder` (implementing ``encode`` and ``training_loss``). The trainer only
uses what is defined here, so it never needs to know which architecture it trains.

Parameter layout (shared by all architectures, and by the dictionary_learning export):
``W_enc`` [D, F], ``b_enc`` [F], ``W_dec`` [F, D] with unit-norm rows, ``b_dec`` [D].
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from masksae.errors import ConfigError
from masksae.train.kernels import native
from masksae.train.kernels.workspace import workspace
from masksae.train.optim import KnownGradNorm
from masksae.train.sae.geometric_median import geometric_median
from masksae.train.sae_config import SAEConfig, check_non_negative, check_unit_interval

__all__ = [
    "SAEConfig",
    "SparseAutoencoder",
    "StepContext",
    "StepOutput",
    "check_non_negative",
    "check_unit_interval",
]

_FP32_EPS = torch.finfo(torch.float32).eps


class StepContext(NamedTuple):
    """What the trainer tells ``training_loss`` about the current step."""

    step: int
    """0-based optimizer step."""
    total_steps: int
    """Planned number of steps (for warmups expressed as fractions)."""
    dead_mask_F: Tensor | None = None
    """bool [F]: latents that are dead once this batch's tokens are counted unless they fire
    in it (their tokens-since-fired counter + B >= dead_tokens_threshold). The SAE drops the
    latents that fire in this batch before using it, which is dictionary_learning's order:
    count the batch, reset the latents that fired, then mask. None = none can be dead."""
    fused: bool = True
    """Use the fused sparse kernels (TopK family); False runs the dense reference path."""
    select_dtype: str = "float32"
    """Precision of the fused path's selection product (TopK family): "float32", or
    "bfloat16" (choose in bf16, re-rank the candidates in fp32; ``train.sae.refine``)."""
    want_metrics: bool = True
    """False when the caller reads neither this step's metrics nor its reconstruction (the
    trainer between logging steps): ``training_loss`` then skips the passes over the batch
    they cost and returns ``metrics`` empty and, where the loss does not need it, no
    ``x_hat_BD``."""


class StepOutput(NamedTuple):
    """What ``training_loss`` returns."""

    loss: Tensor
    """Scalar to backpropagate."""
    x_hat_BD: Tensor | None
    """Full reconstruction (all groups), as used by the loss (None when it was not needed:
    ``StepContext.want_metrics`` False on the fused path)."""
    fired_F: Tensor
    """bool [F]: latents with a nonzero activation somewhere in this batch."""
    metrics: dict[str, Tensor]
    """Detached scalars: at least mse, fvu, l0, l2_loss (+ auxk_loss for the TopK family);
    empty when ``StepContext.want_metrics`` is False."""


class SparseAutoencoder(nn.Module):
    """Base SAE: parameters, decode, decoder constraints, data init and input-scale folding.

    Subclasses set ``config_class`` and implement ``encode`` and ``training_loss``.
    """

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    subtract_b_dec_from_input: ClassVar[bool] = True
    """Encoder input is x - b_dec (all but dictionary_learning's JumpReLU, which uses x)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(cfg).__name__}"
            )
        self.cfg = cfg
        D, F = cfg.d_in, cfg.d_sae
        # dictionary_learning init: random unit decoder rows, encoder = decoder transpose.
        W_dec_FD = torch.randn(F, D)
        W_dec_FD /= W_dec_FD.norm(dim=-1, keepdim=True)
        # W_enc is [D, F] but stored latent-major (strides (1, D)): the fused kernels read and
        # write it per latent, and transposing copies of [D, F] cost as much as the sparse
        # kernels themselves on CPU. clone() keeps the transposed view's layout; checkpoints
        # save contiguous copies, and load_state_dict copies into this layout.
        self.W_enc = nn.Parameter(W_dec_FD.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.W_dec = nn.Parameter(W_dec_FD)
        self.b_dec = nn.Parameter(torch.zeros(D))

    # ---- forward pieces -------------------------------------------------------------
    def pre_activations(self, x_BD: Tensor) -> Tensor:
        """Encoder pre-activations [B, F] (before ReLU / selection)."""
        if self.subtract_b_dec_from_input:
            x_BD = x_BD - self.b_dec
        return x_BD @ self.W_enc + self.b_enc

    def encode(self, x_BD: Tensor) -> Tensor:
        """Latent activations f [B, F] with the inference rule of the architecture."""
        raise NotImplementedError

    def decode(self, f_BF: Tensor) -> Tensor:
        """Reconstruction x_hat [B, D] = f @ W_dec + b_dec."""
        return f_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD: Tensor) -> Tensor:
        """decode(encode(x))."""
        return self.decode(self.encode(x_BD))

    def training_loss(self, x_BD: Tensor, ctx: StepContext) -> StepOutput:
        """Loss of one training step (may update buffers such as the threshold)."""
        raise NotImplementedError

    # ---- training-time constraints ---------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor) -> None:
        """Set b_dec to the geometric median of a batch (Weiszfeld, 100 iterations)."""
        median_D = geometric_median(x_BD.to(self.b_dec.device, torch.float32))
        self.b_dec.copy_(median_D.to(self.b_dec.dtype))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> list[KnownGradNorm]:
        """Drop the gradient component along each decoder row (call before the step).

        The row direction is ``row / (||row|| + 1e-6)``, dictionary_learning's
        ``remove_gradient_parallel_to_decoder_directions`` to the last bit (the 1e-6 leaves
        ~2e-6 of the parallel component; matching it keeps the reference-equivalence test
        at fp32 rounding). Returns the new gradient's squared norm where the pass computed
        it on the way (the C kernel), for ``clip_grad_norm``'s ``known``."""
        grad_FD = self.W_dec.grad
        if grad_FD is None:
            return []
        W_FD = self.W_dec
        if (
            native.enabled_for(W_FD)
            and W_FD.dtype == grad_FD.dtype == torch.float32
            and W_FD.is_contiguous()
            and grad_FD.is_contiguous()
        ):
            rows_sq_F = native.remove_parallel_rows(W_FD.detach(), grad_FD)  # one pass per row
            return [KnownGradNorm(grad_FD, rows_sq_F.sum(), grad_FD._version)]
        # g -= (g . u) u with u = w / (|w| + 1e-6), computed as g -= (g . w) / (|w| + 1e-6)^2 w
        # in three passes and one reused [F, D] buffer: the form with unit rows made three
        # fresh [F, D] temporaries (page faults on CPU); equal to fp32 rounding
        denom_F = torch.linalg.vector_norm(W_FD, dim=-1).add_(1e-6).square_()
        prod_FD = workspace().get(
            "decoder_grad_prod", tuple(W_FD.shape), grad_FD.dtype, W_FD.device
        )
        coef_F1 = torch.mul(grad_FD, W_FD, out=prod_FD).sum(dim=-1, keepdim=True)
        grad_FD.addcmul_(coef_F1.div_(denom_F[:, None]).to(W_FD.dtype), W_FD, value=-1)
        return []

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Renormalise decoder rows to unit norm (call after the step): ``row / (||row|| +
        eps)`` with eps = fp32 machine epsilon, as dictionary_learning's
        ``set_decoder_norm_to_unit_norm`` does for fp32 weights (fp32's eps also for other
        dtypes: bf16's 2^-7 would shrink every row by 0.8%)."""
        W_FD = self.W_dec
        if W_FD.dtype == torch.float32 and W_FD.is_contiguous() and native.enabled_for(W_FD):
            native.normalize_rows(W_FD.detach(), _FP32_EPS)  # one pass per row, not two
            return
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True) + _FP32_EPS

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make weights trained on ``scale * x`` act on raw ``x``.

        Every map here is positively homogeneous in (x, biases, thresholds): pre-activations
        of s*x with biases b equal s * (pre-activations of x with b/s), ReLU / top-k /
        ``f > theta`` commute with a positive scale, and decode is linear plus b_dec. So
        dividing b_enc, b_dec and the thresholds by s gives forward(x) == forward_s(s*x) / s.
        """
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ConfigError(f"fold_input_scale: scale={scale!r} must be a positive number")
        self.b_enc /= scale
        self.b_dec /= scale
        self._scale_thresholds(scale)

    def _scale_thresholds(self, scale: float) -> None:
        """Divide the inference threshold (if any) by ``scale``; a negative one means
        "not learned yet" and stays as it is."""
        threshold = getattr(self, "threshold", None)
        if isinstance(threshold, Tensor):
            threshold.copy_(torch.where(threshold >= 0, threshold / scale, threshold))
