"""The SAE optimizer: Adam, fused where torch has it, without layout copies.

torch's fused Adam kernel works on contiguous tensors: given a parameter stored in another
dense order it copies parameter, gradient and moments into contiguous temporaries and the
result back. W_enc is such a parameter (a [D, F] view of latent-major [F, D] storage, see
``SparseAutoencoder``), and those transposing copies cost 3-4x the update itself on the CPU.
Adam is elementwise, so :class:`LayoutAdam` hands the kernel each such parameter (with its
gradient and moments) as the transposed view that *is* contiguous, and puts the views back
afterwards: same arithmetic, same state, no copies. The optimizer state keeps the
parameter's own shape, so its checkpoints are those of ``torch.optim.Adam``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _stored_transposed(p: Tensor) -> bool:
    """True for a 2-D tensor whose transpose is contiguous (and itself is not)."""
    return p.dim() == 2 and not p.is_contiguous() and p.t().is_contiguous()


class LayoutAdam(torch.optim.Adam):
    """``torch.optim.Adam`` that steps transposed-stored 2-D parameters in their storage order,
    and (fused) can apply a gradient clip's factor inside its kernel (:meth:`scale_grads`)."""

    _grad_factor: Tensor | None = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:  # before the swap: the closure's forward needs the real shapes
            with torch.enable_grad():
                loss = closure()
        factor, self._grad_factor = self._grad_factor, None
        outer = self.__dict__.get("grad_scale")  # a torch.amp GradScaler's, if any
        if factor is not None:
            # the fused kernel divides every gradient by grad_scale as it reads it (writing
            # the result back): torch.amp's protocol for unscaling, here the clip's factor
            own = torch.reciprocal(factor).to(torch.float32)
            self.grad_scale = own if outer is None else outer * own
        try:
            with torch.no_grad(), self._storage_order():
                super().step()
        finally:
            if factor is not None:  # leave the attribute as the caller had it
                if outer is None:
                    del self.grad_scale
                else:
                    self.grad_scale = outer
        return loss

    def can_scale_grads(self) -> bool:
        """Whether :meth:`scale_grads` is available: fused Adam on the CPU."""
        return bool(self.defaults.get("fused")) and all(
            p.device.type == "cpu" for p in self._params()
        )

    def scale_grads(self, factor: Tensor) -> None:
        """Have the next :meth:`step` multiply every gradient by ``factor`` (0-d) as its
        kernel reads them, instead of a separate pass over them now. ``zero_grad`` drops it:
        it belongs to the gradients of this step."""
        if not self.can_scale_grads():
            raise RuntimeError("scale_grads needs fused Adam on the CPU")
        self._grad_factor = factor.detach().reshape(())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_factor = None
        super().zero_grad(set_to_none)

    @contextmanager
    def _storage_order(self) -> Iterator[None]:
        swapped = [p for p in self._params() if _swappable(p)]
        for p in swapped:
            self._transpose(p)
        try:
            yield
        finally:
            for p in swapped:
                self._transpose(p)

    def _params(self) -> Iterable[Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _transpose(self, p: Tensor) -> None:
        """Replace p, its gradient and its moments by their transposes (views: no copies)."""
        grad, p.grad = p.grad, None
        p.data = p.data.t()
        p.grad = grad.t()
        state = self.state.get(p)
        if state:
            for key in _MOMENTS:
                if key in state:
                    state[key] = state[key].t()


def _swappable(p: Tensor) -> bool:
    # the gradient must share the parameter's layout, or the kernel would copy it anyway;
    # moments created inside the step follow the (transposed) parameter's layout
    return p.grad is not None and _stored_transposed(p) and _stored_transposed(p.grad)


def make_adam(
    params: Iterable[Tensor], lr: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.Adam:
    """Adam, fused (one multithreaded kernel per parameter, no temporaries) where this torch
    has it for ``device``: measured 4x faster than the default foreach Adam on the CPU at
    F 4096 and 16384 (docs/benchmarks.md); the foreach implementation elsewhere."""
    params = list(params)
    if device.type in ("cpu", "cuda"):
        try:
            return LayoutAdam(params, lr=lr, betas=betas, fused=True)
        except (RuntimeError, TypeError, ValueError):  # torch without fused Adam here
            pass
    return LayoutAdam(params, lr=lr, betas=betas)


@dataclass(frozen=True)
class KnownGradNorm:
    """A gradient's squared norm, computed by the kernel that last wrote the gradient."""

    grad: Tensor
    """The gradient it was computed for (the very tensor)."""
    sq_norm: Tensor
    """0-d fp32: the sum of its squared entries."""
    version: int
    """``grad._version`` right after: any later in-place change makes the norm stale."""

    def holds_for(self, grad: Tensor | None) -> bool:
        return grad is self.grad and grad._version == self.version


def clip_grad_norm(
    params: Iterable[Tensor],
    max_norm: float,
    known: Iterable[KnownGradNorm] = (),
    optimizer: torch.optim.Optimizer | None = None,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``, without its no-op rescale on the CPU, taking the
    norms ``known`` (still current) instead of reading those gradients again, and, given the
    ``optimizer`` that steps exactly these parameters next (a fused CPU :class:`LayoutAdam`),
    leaving the rescale to its kernel (one pass over every gradient fewer; the gradients are
    then scaled by that step).

    torch multiplies every gradient by min(1, max_norm / (norm + 1e-6)) unconditionally, so
    as not to read the norm back from an accelerator; on the CPU reading it is free, and when
    the factor is 1 the multiply is one wasted pass over every parameter. Same result as
    torch's otherwise (to the rounding of the norm's summation order, and with the optimizer,
    of dividing by the factor's reciprocal)."""
    params = [p for p in params if p.grad is not None]
    known = list(known)
    if not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6: its one-call version
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    known_sq = []
    to_read = []
    for p in params:
        norm = next((k for k in known if k.holds_for(p.grad)), None)
        if norm is not None:
            known_sq.append(norm.sq_norm)
        else:
            # a norm does not depend on the layout: take W_enc's gradient in its storage
            # order (a reduction over the transposed view runs at about half speed)
            to_read.append(p.grad.t() if _stored_transposed(p.grad) else p.grad)
    total = torch.nn.utils.get_total_norm(to_read) if to_read else torch.zeros(())
    if known_sq:
        total = (total.square() + torch.stack(known_sq).to(total).sum()).sqrt()
    if total.device.type == "cpu" and bool(max_norm / (total + 1e-6) >= 1.0):
        return total
    if _steps_exactly(optimizer, params):
        # torch's factor, as clip_grads_with_norm_ computes it
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        optimizer.scale_grads(factor)
        return total
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _steps_exactly(optimizer: torch.optim.Optimizer | None, params: list[Tensor]) -> bool:
    """Whether ``optimizer`` can scale gradients in its step and steps just ``params``."""
    if not isinstance(optimizer, LayoutAdam) or not optimizer.can_scale_grads():
        return False
    stepped = {id(p) for p in optimizer._params() if p.grad is not None}
    return stepped == {id(p) for p in params}
