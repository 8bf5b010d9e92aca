"""Generated prose: the comparison sentences and the why-L0-exceeds-k paragraph."""

from __future__ import annotations

from typing import Any

from masksae.evaluate.report.compare import Comparison
from masksae.evaluate.report.frontier import L0_FLAG_RATIO, l0_flagged, mean_l0
from masksae.evaluate.report.grouping import Cells, Setting, k_label, ks_of, method_label, ps_of
from masksae.evaluate.report.rows import MASKED_SECTION, MetricRow, metric_at

_MASKED_L0 = metric_at(MASKED_SECTION, "l0")


def comparison_sentence(row: MetricRow, p: float, comparisons: list[Comparison]) -> str:
    """One bullet: how masking at ``p`` changed ``row`` at each equal-L0 point, e.g.
    "masking (p=0.3) changed it by +1.20 [-0.50, 2.90] points at L0 = 31.6 (masked k=20;
    interval includes zero); no comparison at L0 = 21.8 (outside the other method's range)"."""
    found, missing = [], []
    for c in comparisons:
        point = f"L0 = {c.l0:.1f}"
        if c.diff is None:
            missing.append(point)
            continue
        text = f"{c.diff.fmt(row.digits, signed=True)} {row.unit}".rstrip()
        details = [f"{'masked' if c.anchor_p else 'unmasked'} {k_label(c.k)}"]
        if not c.diff.has_interval:
            details.append("one seed: no interval")
        else:
            details.append(f"interval {'excludes' if c.diff.excludes_zero else 'includes'} zero")
        if c.note:
            details.append(c.note)
        found.append(f"{text} at {point} ({'; '.join(details)})")
    parts = []
    if found:
        parts.append(f"masking (p={p:g}) changed it by " + ", ".join(found))
    if missing:
        parts.append(
            f"no comparison at {', '.join(missing)} (outside the other method's L0 range, "
            "or no run of the same seed)"
        )
    return f"- **{row.label}**: " + "; ".join(parts) + "."


def _ratio_range(ratios: list[float]) -> str:
    """ "1.55–1.58× k" (or "1.55× k" when they round alike)."""
    lo, hi = f"{min(ratios):.2f}", f"{max(ratios):.2f}"
    return f"{lo}× k" if lo == hi else f"{lo}–{hi}× k"


def _uses_batch_threshold(architecture: Any) -> bool:
    return "batch_topk" in str(architecture)


def l0_shift_paragraph(setting: Setting, cells: Cells) -> str | None:
    """Why a masked SAE fires more (or fewer) latents on clean text than its k: generated
    when a masked cell's measured L0 is flagged, with the numbers of this setting and, when
    the results carry masked-text metrics, the test of the explanation."""
    lines = []
    ratios: list[float] = []
    masked_text_l0s: list[tuple[Any, float]] = []
    examples: dict[float, tuple[int, str]] = {}
    for p in [p for p in ps_of(cells) if p > 0]:
        flagged_ks, clean, base, on_masked = [], [], [], []
        for k in ks_of(cells):
            docs = cells.get((k, p), [])
            l0 = mean_l0(docs)
            if not docs or not l0_flagged(l0, k):
                continue
            flagged_ks.append(k)
            clean.append(l0 / k)
            unmasked = mean_l0(cells.get((k, 0.0), []))
            if unmasked is not None:
                base.append(unmasked / k)
                examples.setdefault(
                    p,
                    (
                        0,
                        f"At {k_label(k)} the masked SAE (p={p:g}) fires {l0:.1f} latents per "
                        f"clean-text token, the unmasked one {unmasked:.1f}. ",
                    ),
                )
            masked_vals = [v for d in docs if (v := _MASKED_L0(d)) is not None]
            if masked_vals:
                masked_l0 = sum(masked_vals) / len(masked_vals)
                masked_text_l0s.append((k, masked_l0))
                on_masked.append(masked_l0 / k)
        if not flagged_ks:
            continue
        ratios += clean
        if p in examples:  # the example comes from the p flagged at the most k
            examples[p] = (len(flagged_ks), examples[p][1])
        text = (
            f"{method_label(p)}: {_ratio_range(clean)} on clean text at "
            f"k = {', '.join(str(k) for k in flagged_ks)}"
        )
        if base:
            text += f" (the unmasked SAEs: {_ratio_range(base)})"
        if on_masked:
            text += f", {_ratio_range(on_masked)} on masked text"
        lines.append(text)
    if not lines:
        return None
    example = max(examples.values(), default=(0, ""), key=lambda e: e[0])[1]
    arch = setting[2]
    more = all(r > 1 for r in ratios)
    if _uses_batch_threshold(arch) and more:
        mechanism = (
            "A BatchTopK-family SAE keeps the k·B largest activations of each training batch "
            "of B tokens and, at inference, replaces that batch rule by one threshold θ, the "
            "running mean of the smallest activation it kept. θ is therefore calibrated so "
            "that the *training* distribution averages k active latents per token. In a "
            "masked store a fraction p of the positions hold the mask string and many others "
            "see a corrupted context; where those positions need fewer latents than ordinary "
            "tokens (the mask-string positions are nearly alike), the batch budget goes to the "
            "remaining tokens, and θ settles where an ordinary token fires more than k. Clean "
            "evaluation text has no masked positions, so every token fires like an ordinary "
            "one and L0 exceeds k: up to about k / (1 − p) when the masked positions use "
            "almost none (1.43× k at p = 0.3)."
        )
    elif _uses_batch_threshold(arch):
        mechanism = (
            "A BatchTopK-family SAE replaces its training-time batch top-k by one threshold "
            "θ, calibrated so that the *training* distribution averages k active latents per "
            "token. When the masked positions of the training batches took more than their "
            "share of the k·B budget, θ settles where an ordinary token fires fewer than k, "
            "and clean text, made only of ordinary tokens, shows an L0 below k."
        )
    else:
        mechanism = (
            f"This architecture ({arch}) learned its sparsity on the masked training "
            "distribution; clean text is a different distribution, so the number of latents "
            "that clear its thresholds differs from what training calibrated."
        )
    if masked_text_l0s:
        close = all(not l0_flagged(v, k) for k, v in masked_text_l0s)
        if close:
            test = (
                "On masked text, the distribution these SAEs were trained on, their L0 is "
                f"within a factor {L0_FLAG_RATIO:g} of k, as this explanation predicts: the "
                "excess on clean text is the distribution shift."
            )
        else:
            test = (
                "On masked text their L0 is also far from k, so the distribution shift does "
                "not account for the whole gap here."
            )
    else:
        test = (
            "The results carry no masked-text metrics to test this: evaluate with "
            "`masksae evaluate --eval-masked` to measure L0 on masked text, where it should be "
            "close to k."
        )
    title = "more" if more else "a different number of"
    return (
        f"**Why the masked SAEs fire {title} latents on clean text.** "
        + example
        + "Measured L0 per k: "
        + "; ".join(lines)
        + ". "
        + mechanism
        + " "
        + test
        + " At equal k the two methods therefore sit at different sparsities; compare them "
        "at equal measured L0 (the frontier comparison)."
    )
