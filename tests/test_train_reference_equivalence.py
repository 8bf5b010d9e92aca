"""N-step equivalence of the trainer with dictionary_learning's documented update rule.

``ReferenceTrainer`` below is our own transcription of the rule that
saprmarks/dictionary_learning's ``MatryoshkaBatchTopKTrainer.update`` / ``BatchTopKTrainer``
apply per step (read from trainers/matryoshka_batch_top_k.py, batch_top_k.py and
trainers/trainer.py; written from the description, not copied):

1. step 0: b_dec <- geometric median of the batch (Weiszfeld from the mean, <= 100
   iterations, stop when the estimate moves < 1e-5);
2. post = relu((x - b_dec) @ W_enc + b_enc); keep the k * B largest entries of the batch;
3. if step > threshold_start_step: m = min positive kept value (0 if none); theta = m the first
   time (theta < 0), else theta <- beta theta + (1 - beta) m;
4. x_hat_0 = b_dec, x_hat_i = x_hat_{i-1} + f_i @ W_dec_i; recon = mean_i(w_i mean_b
   ||x - x_hat_i||^2);
5. dead counters: every counter += B, counters of latents with a kept value > 0 reset to 0;
   dead = counter >= dead threshold (so the mask includes this batch);
6. AuxK (if any dead): k_aux = min(D // 2, n_dead) largest post values among dead latents per
   token, decoded without b_dec; loss = mean_b ||r - r_aux||^2 / mean_b ||r - mean_b r||^2
   with r = (x - x_hat) detached, NaN -> 0;
7. loss = recon + auxk_alpha * AuxK; backward; remove from each decoder row's gradient its
   component along the row (row / (||row|| + 1e-6)); clip the global grad norm at 1;
   Adam step; lr multiplier for the next step: step / W during warmup, 1, then
   (T - step) / (T - decay_start) from decay_start on;
8. decoder rows <- row / (||row|| + eps_fp32).

The trainer runs through ``Trainer.train`` on a real store; the batches it reads are
recorded and replayed into the transcription from the trainer's initial weights. Those are
untied (encoder != decoder transpose, b_enc != 0): with the tied init, a latent that is the
only selection of its token has an analytically zero gradient (the residual is orthogonal to
its decoder row), and Adam turns the rounding noise of that zero into lr-sized steps, so any
two fp32 implementations part by ~1e-4 there. Dimensions
are chosen so that many latents die within a few steps (k * B selections for 4x as many
latents), warmup and decay both act, and the threshold starts mid-run. One documented
deviation is mapped: our ``threshold_start_step`` is the first step that updates (``>=``),
the reference's is the last that does not (``>``), so ours is set to the reference's + 1.
"""

from __future__ import annotations

import json

import pytest
import torch

from masksae.train.config import RunSpec, TrainConfig
from masksae.train.sae import build_sae, sae_config_from_dict
from masksae.train.trainer import Trainer
from test_train_fixtures import make_store

pytestmark = pytest.mark.usefixtures("one_thread")

D, F, K, B = 16, 128, 2, 32
STEPS, WARMUP, DECAY_FRAC = 24, 6, 0.75
THRESHOLD_START_REF = 9  # reference: updates at steps > 9
DEAD_TOKENS = 3 * B  # a latent idle for 3 batches is dead (reference: 10M tokens)
LR = 3e-3


# ---------------------------------------------------------------------------- transcription
def reference_geometric_median(points: torch.Tensor) -> torch.Tensor:
    guess = points.mean(dim=0)
    for _ in range(100):
        prev = guess
        weights = 1 / torch.norm(points - guess, dim=1)
        weights = weights / weights.sum()
        guess = (weights[:, None] * points).sum(dim=0)
        if torch.norm(guess - prev) < 1e-5:
            break
    return guess


def reference_lr_multiplier(step: int) -> float:
    decay_start = int(DECAY_FRAC * STEPS)
    if step < WARMUP:
        return step / WARMUP
    if step >= decay_start:
        return (STEPS - step) / (STEPS - decay_start)
    return 1.0


class ReferenceTrainer:
    """dictionary_learning's per-step rule for (Matryoshka)BatchTopK, on explicit tensors."""

    def __init__(self, init: dict[str, torch.Tensor], group_sizes: list[int]) -> None:
        self.W_enc = torch.nn.Parameter(init["W_enc"].clone())  # [D, F]
        self.b_enc = torch.nn.Parameter(init["b_enc"].clone())
        self.W_dec = torch.nn.Parameter(init["W_dec"].clone())  # [F, D]
        self.b_dec = torch.nn.Parameter(init["b_dec"].clone())
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.threshold = torch.tensor(-1.0)
        self.group_sizes = group_sizes
        self.group_weights = [1.0 / len(group_sizes)] * len(group_sizes)
        self.counters = torch.zeros(F, dtype=torch.long)
        self.optimizer = torch.optim.Adam(self.params, lr=LR, betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda=reference_lr_multiplier
        )
        self.losses: list[float] = []
        self.auxk_losses: list[float] = []
        self.dead_counts: list[int] = []

    def update(self, step: int, x: torch.Tensor) -> None:
        if step == 0:
            self.b_dec.data = reference_geometric_median(x)
        post = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        top = post.flatten().topk(K * x.shape[0], sorted=False)
        f = torch.zeros_like(post.flatten()).scatter(-1, top.indices, top.values)
        f = f.reshape(post.shape)
        if step > THRESHOLD_START_REF:
            with torch.no_grad():
                active = f[f > 0]
                m = active.min() if active.numel() else torch.tensor(0.0)
                if self.threshold < 0:
                    self.threshold = m.clone()
                else:
                    self.threshold = 0.999 * self.threshold + 0.001 * m
        x_hat = torch.zeros_like(x) + self.b_dec
        l2 = []
        for i, (f_i, W_i) in enumerate(
            zip(f.split(self.group_sizes, 1), self.W_dec.split(self.group_sizes, 0), strict=True)
        ):
            x_hat = x_hat + f_i @ W_i
            l2.append((x - x_hat).pow(2).sum(dim=-1).mean() * self.group_weights[i])
        recon = torch.stack(l2).mean()
        fired = f.sum(0) > 0
        self.counters += x.shape[0]
        self.counters[fired] = 0
        dead = self.counters >= DEAD_TOKENS
        n_dead = int(dead.sum())
        self.dead_counts.append(n_dead)
        residual = (x - x_hat).detach()
        if n_dead > 0:
            k_aux = min(D // 2, n_dead)
            aux_top = torch.where(dead[None], post, -torch.inf).topk(k_aux, sorted=False)
            aux_f = torch.zeros_like(post).scatter(-1, aux_top.indices, aux_top.values)
            l2_aux = (residual - aux_f @ self.W_dec).pow(2).sum(dim=-1).mean()
            denom = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean()
            auxk = (l2_aux / denom).nan_to_num(0.0)
        else:
            auxk = torch.zeros(())
        loss = recon + auxk / 32
        self.losses.append(float(loss.detach()))
        self.auxk_losses.append(float(auxk.detach()))
        loss.backward()
        with torch.no_grad():
            W_DF, g_DF = self.W_dec.data.T, self.W_dec.grad.T
            normed_DF = W_DF / (W_DF.norm(dim=0, keepdim=True) + 1e-6)
            g_DF -= (g_DF * normed_DF).sum(dim=0) * normed_DF
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        with torch.no_grad():
            W_DF = self.W_dec.data.T
            W_DF /= W_DF.norm(dim=0, keepdim=True) + torch.finfo(W_DF.dtype).eps


# ---------------------------------------------------------------------------- the comparison
class RecordingStore:
    """The store, with every batch its stream yields kept (the trainer reads it once)."""

    def __init__(self, store) -> None:
        self._store = store
        self.batches: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def stream(self, *args, **kwargs):
        for batch in self._store.stream(*args, **kwargs):
            self.batches.append(batch.clone())
            yield batch


def build_untied(cfg):
    """``build_sae``, then encoder weights and biases moved off the tied init (see above)."""
    sae = build_sae(cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn(sae.W_enc.shape, generator=g))
        sae.b_enc.normal_(0, 0.1, generator=g)
    return sae


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("ref-eq") / "store", n_tokens=1024, d_model=D)


SAE_CONFIGS = {
    "matryoshka_batch_topk": {
        "architecture": "matryoshka_batch_topk",
        "group_fractions": [0.125, 0.375, 0.5],
    },
    "batch_topk": {"architecture": "batch_topk"},
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "dense"])
@pytest.mark.parametrize("arch", sorted(SAE_CONFIGS))
def test_trainer_equals_reference_update_rule(store, tmp_path, monkeypatch, arch, fused):
    sae_dict = {
        **SAE_CONFIGS[arch],
        "d_sae": F,
        "k": K,
        "threshold_start_step": THRESHOLD_START_REF + 1,  # ours: first step that updates
        "threshold_beta": 0.999,  # the reference's (set: an unset one is fitted to short runs)
        "dead_tokens_threshold": DEAD_TOKENS,
    }
    seed = 3
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=B,
        lr=LR,
        warmup_steps=WARMUP,
        decay_start_frac=DECAY_FRAC,
        grad_clip=1.0,
        normalize_activations=False,
        fused=fused,
        device="cpu",
        checkpoint_every=0,
        log_every=1,
    )
    monkeypatch.setattr("masksae.train.sae.build_sae", build_untied)  # what the trainer calls
    recording = RecordingStore(store)
    out = tmp_path / "run"
    Trainer(recording, [RunSpec("r", sae_dict, None, seed)], cfg, out, progress=False).train()
    assert len(recording.batches) == STEPS

    # the trainer's initial weights: the same seed and build as its run
    torch.manual_seed(seed)
    init_sae = build_untied(sae_config_from_dict({**sae_dict, "d_in": D}))
    init = {k: v.detach().clone() for k, v in init_sae.state_dict().items()}
    ref = ReferenceTrainer(init, list(init_sae.group_sizes))
    for step, x in enumerate(recording.batches):
        ref.update(step, x)

    # the run exercised every part of the rule
    assert ref.dead_counts[1] == 0 and max(ref.dead_counts) > F // 4
    assert sum(a > 0 for a in ref.auxk_losses) >= STEPS // 2
    assert float(ref.threshold) > 0

    state = torch.load(out / "r" / "train_state.pt", map_location="cpu", weights_only=False)
    ours = state["model"]
    for name, theirs in [
        ("W_enc", ref.W_enc),
        ("b_enc", ref.b_enc),
        ("W_dec", ref.W_dec),
        ("b_dec", ref.b_dec),
        ("threshold", ref.threshold),
    ]:
        theirs = theirs.detach()
        scale = theirs.abs().max().clamp_min(1e-12)
        rel = float((ours[name] - theirs).abs().max() / scale)
        assert rel < 1e-6, f"{name}: max |ours - reference| / max |reference| = {rel:.2e}"
    # the moved weights really moved (a no-op trainer would not pass)
    assert (ref.W_enc.detach() - init["W_enc"]).abs().max() > 1e-2
    assert torch.equal(state["tokens_since_fired_F"], ref.counters)

    records = [json.loads(line) for line in (out / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record, loss, auxk, n_dead in zip(
        records, ref.losses, ref.auxk_losses, ref.dead_counts, strict=True
    ):
        assert record["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7), record["step"]
        assert record["auxk_loss"] == pytest.approx(auxk, rel=1e-5, abs=1e-7), record["step"]
        assert record["dead_frac"] == n_dead / F
        assert record["lr"] == pytest.approx(LR * reference_lr_multiplier(record["step"] - 1))
