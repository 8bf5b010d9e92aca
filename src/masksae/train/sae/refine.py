"""Select in bf16, compute in fp32: re-rank a low-precision selection on full-precision values.

The fused step's cost is one dense [B, D] x [D, F] encoder product, needed only to *choose*
the top-k entries; the chosen entries' values (and everything after) come from the selected
pairs alone. Run in bf16 that product is several times cheaper, but bf16 scores differ from the
fp32 ones by up to about one bf16 rounding step, so entries near the selection threshold could
swap places. :class:`ExactPreacts` closes that gap:

1. candidates are taken from the bf16 scores with a margin (BatchTopK: the pre-filter's
   ~1.5 k B entries above a cut ``c``; TopK / AuxK: the top k + k/4 + 8 of each row);
2. their pre-activations are recomputed in fp32 on the selected pairs only (SDDMM, O(N D));
3. the top k are taken on the fp32 values (threshold T), and the choice is checked: every
   entry left out has a bf16 score <= c, hence an fp32 value <= c + its error; the selection is
   accepted when c + tol <= T, with tol = ``safety`` x max(largest |fp32 - bf16| seen among
   the candidates, one bf16 ulp at T). Otherwise the cut is lowered to T - tol and the check
   repeated (BatchTopK), or the failing rows are recomputed densely in fp32 (TopK / AuxK);
   after two widenings (or one that takes in over 1/8 of the batch) a BatchTopK step
   computes all its scores in fp32.

So the selection equals the fp32 one unless an entry outside the candidates has a bf16 error
larger than ``safety`` times the largest error among tens of thousands of candidates; ties
that close (within fp32 rounding of each other) are arbitrary in the fp32 path too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from masksae.train.kernels import native, pair_dot
from masksae.train.kernels.plan import csr_offsets
from masksae.train.sae.selection import _MAX_WIDEN, _greater, split_flat, top_positions

DEFAULT_SAFETY = 2.0


def row_candidates(k: int, n_cols: int) -> int:
    """Candidates per row re-ranked for a per-row top-k: k + k/4 + 8 (at most the row)."""
    return min(n_cols, k + k // 4 + 8)


@dataclass
class RefineStats:
    """What the re-ranking did in one step (benchmarks and tests read it)."""

    entries: int = 0
    """Entries whose pre-activation was recomputed in fp32."""
    widened: int = 0
    """Times a BatchTopK candidate set was widened after a failed check."""
    dense_rows: int = 0
    """Rows whose scores were recomputed densely in fp32 (a failed per-row check, or every row
    after a BatchTopK fallback)."""


class ExactPreacts:
    """fp32 pre-activations ``xin @ W_enc + b_enc``, computed only for the entries asked for."""

    def __init__(
        self, xin_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, *, safety: float = DEFAULT_SAFETY
    ) -> None:
        if not (math.isfinite(safety) and safety >= 1):
            raise ValueError(f"safety={safety!r}: expected a finite number >= 1")
        self.xin_BD = xin_BD.detach().float()
        self.W_enc_DF = W_enc_DF.detach()
        self.b_enc_F = b_enc_F.detach().float()
        self.safety = safety
        self.stats = RefineStats()

    def columns(self, cols_K: Tensor) -> ExactPreacts:
        """The same pre-activations restricted to the latents ``cols_K`` (their column
        indices become 0..K-1); shares this re-ranker's statistics."""
        sub = ExactPreacts.__new__(ExactPreacts)
        sub.xin_BD, sub.safety, sub.stats = self.xin_BD, self.safety, self.stats
        # rows of the latent-major storage, transposed back: W_enc's own layout
        sub.W_enc_DF = self.W_enc_DF.t().index_select(0, cols_K).t()
        sub.b_enc_F = self.b_enc_F.index_select(0, cols_K)
        return sub

    # ---- full-precision values -----------------------------------------------------------
    def entries(self, rows_N: Tensor, lat_N: Tensor) -> Tensor:
        """fp32 [N] pre-activations at (rows, lats); entries sorted by row, latents unique
        within a row."""
        offsets = csr_offsets(rows_N, self.xin_BD.shape[0])
        self.stats.entries += rows_N.numel()
        return pair_dot(self.xin_BD, rows_N, offsets, lat_N, self.W_enc_DF.t(), self.b_enc_F)

    def rows(self, rows_R: Tensor) -> Tensor:
        """fp32 [R, F] pre-activations of whole rows."""
        self.stats.dense_rows += rows_R.numel()
        return torch.addmm(self.b_enc_F, self.xin_BD[rows_R], self.W_enc_DF.float())

    def dense(self) -> Tensor:
        """fp32 [B, F] pre-activations."""
        self.stats.dense_rows += self.xin_BD.shape[0]
        return torch.addmm(self.b_enc_F, self.xin_BD, self.W_enc_DF.float())

    def _tolerance(self, exact: Tensor, approx: Tensor, at: Tensor) -> Tensor:
        """safety * max(largest |exact - approx| over finite entries, one ulp of approx's
        dtype at ``at``)."""
        if (
            exact.dtype == torch.float32
            and approx.dtype in (torch.bfloat16, torch.float32)
            and exact.is_contiguous()
            and approx.is_contiguous()
            and native.enabled_for(exact)
        ):
            err_max = native.max_abs_diff_finite(exact, approx)  # one pass, not five
        else:
            finite = torch.isfinite(approx)
            err = torch.where(finite, (exact - approx.float()).abs(), 0.0)
            err_max = err.amax() if err.numel() else err.new_zeros(())
        ulp = torch.finfo(approx.dtype).eps * at.abs()
        return self.safety * torch.maximum(err_max, torch.nan_to_num(ulp, posinf=0.0))

    # ---- re-ranking ----------------------------------------------------------------------
    def rerank_batch(
        self,
        flat: Tensor,
        n_cols: int,
        cand_C: Tensor,
        approx_C: Tensor,
        cut: Tensor,
        k_total: int,
        mask_out: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """(candidates, their fp32 scores, increasing positions of the ``k_total`` largest)
        holding the batch's fp32 top ``k_total``, given low-precision ``flat`` scores and
        candidates ``cand_C`` (their scores ``approx_C``) with every other entry <= ``cut``;
        None when two widenings did not verify (compute densely then)."""
        cut = cut.float()
        for _ in range(_MAX_WIDEN + 1):
            exact_C = self.entries(*split_flat(cand_C, n_cols))
            threshold, top = top_positions(exact_C, k_total)
            tol = self._tolerance(exact_C, approx_C, threshold)
            if cand_C.numel() == flat.numel() or bool(cut + tol <= threshold):
                return cand_C, exact_C, top
            # every entry that could still beat the threshold is above threshold - tol; round
            # that cut down onto flat's grid so the comparison in flat's dtype keeps them all
            want = threshold - tol
            cut_lp = (want - torch.finfo(flat.dtype).eps * want.abs()).to(flat.dtype)
            cut = cut_lp.float()
            cand_C, approx_C = _greater(flat, cut_lp, mask_out)
            self.stats.widened += 1
            if cand_C.numel() > flat.numel() // 8:  # a dense product is cheaper than this SDDMM
                return None
        return None

    def rerank_rows(self, score_BF: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(latent indices [B, k] increasing per row, their fp32 scores) of every row's top k
        in full precision, from low-precision ``score_BF`` (-inf entries stay excluded)."""
        B, F = score_BF.shape
        n_cand = row_candidates(k, F)
        idx_BC = score_BF.topk(n_cand, dim=-1, sorted=False).indices.sort(dim=-1).values
        approx_BC = score_BF.gather(1, idx_BC)
        rows_N = torch.arange(B, device=score_BF.device).repeat_interleave(n_cand)
        exact_BC = self.entries(rows_N, idx_BC.reshape(-1)).view(B, n_cand)
        exact_BC = torch.where(approx_BC == -math.inf, -math.inf, exact_BC)
        top = exact_BC.topk(k, dim=-1, sorted=False)
        idx_BK = idx_BC.gather(1, top.indices)
        vals_BK = top.values
        if n_cand < F:
            # entries outside the candidates score <= the row's smallest candidate
            cut_B = approx_BC.amin(dim=-1).float()
            threshold_B = vals_BK.amin(dim=-1)
            tol_B = self._tolerance(exact_BC, approx_BC, threshold_B)
            bad_B = torch.isfinite(cut_B) & (cut_B + tol_B > threshold_B)
            if bool(bad_B.any()):
                bad_R = bad_B.nonzero().squeeze(1)
                dense_RF = self.rows(bad_R)
                dense_RF = torch.where(score_BF[bad_R] == -math.inf, -math.inf, dense_RF)
                fix = dense_RF.topk(k, dim=-1, sorted=False)
                idx_BK[bad_R] = fix.indices
                vals_BK[bad_R] = fix.values
        order = idx_BK.argsort(dim=-1)
        return idx_BK.gather(1, order), vals_BK.gather(1, order)
