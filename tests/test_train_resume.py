"""Interrupted training: SIGKILL / SIGINT of a real `masksae train` process, KeyboardInterrupt.

Every scenario ends with `--resume` and checks the final weights are bit-exact against an
uninterrupted run and that metrics.jsonl holds each logged step exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from masksae.train import checkpoint as ckpt
from masksae.train.config import RunSpec, TrainConfig
from masksae.train.metrics_log import read_metrics
from masksae.train.trainer import Trainer
from test_train_fixtures import make_store

RUN = "batch_topk-k3-F64-s0"
STEPS = 24
#: `masksae train` with every SAE step slowed down, so a test can stop it mid-run.
SLOW_CLI = """
import sys, time
from masksae.train import trainer
delay = float(sys.argv[1])
step = trainer._Run.step
def slow_step(self, *args, **kwargs):
    time.sleep(delay)
    return step(self, *args, **kwargs)
trainer._Run.step = slow_step
from masksae.cli import app
app(sys.argv[2:], prog_name="masksae")
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume-store") / "store"
    make_store(path, n_tokens=4096, chunk_tokens=512)
    return path


@pytest.fixture(scope="module")
def reference(store_path, tmp_path_factory) -> Path:
    """The uninterrupted run (in-process CLI), to compare every resumed run against."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = CliRunner().invoke(_app(), train_args(store_path, out))
    assert result.exit_code == 0, result.output
    return out / RUN


def _app():
    from masksae.cli import app

    return app


def train_args(store: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--store", str(store), "--out", str(out),
        "--architecture", "batch_topk", "--k", "3", "--d-sae", "64",
        "--steps", str(STEPS), "--batch-size", "128", "--lr", "3e-3",
        "--checkpoint-every", "4", "--log-every", "2",
        "--device", "cpu", "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after resume"


def assert_same_metrics(reference: Path, resumed: Path) -> None:
    ref, got = read_metrics(reference), read_metrics(resumed)
    steps = [r["step"] for r in got]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics.jsonl: {steps}"
    assert steps == [r["step"] for r in ref] == list(range(2, STEPS + 1, 2))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl, tolerating a torn last line while the writer is running."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    import json

    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def start_slow_train(store: Path, out: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, str(delay), *train_args(store, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        # a suite run as a background job inherits SIGINT ignored (POSIX shells do that for
        # `cmd &`), and the trainer rightly leaves an ignored SIGINT alone: give the child
        # the default disposition a terminal user's process has
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_checkpoint_and_progress(proc: subprocess.Popen, run_dir: Path, timeout=120.0) -> int:
    """Block until a periodic checkpoint exists and a later step is logged; its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            pytest.fail(f"the training process ended (rc {proc.returncode}) too early:\n{out}")
        ckpts = ckpt.list_checkpoints(run_dir) if run_dir.exists() else {}
        if ckpts and max(logged_steps(run_dir), default=0) > max(ckpts):
            return max(ckpts)
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no periodic checkpoint appeared in {run_dir} within {timeout} s")


def test_sigkill_then_resume_is_bit_exact(store_path, reference, tmp_path):
    out = tmp_path / "out"
    proc = start_slow_train(store_path, out, delay=0.15)
    try:
        ckpt_step = wait_for_checkpoint_and_progress(proc, out / RUN)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < ckpt_step < STEPS
    assert not (out / RUN / "config.json").exists()  # the run had not finished
    # metrics past the checkpoint were logged before the kill: resume must drop them
    assert max(logged_steps(out / RUN)) > ckpt_step

    result = CliRunner().invoke(_app(), train_args(store_path, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert_same_weights(reference, out / RUN)
    assert_same_metrics(reference, out / RUN)
    assert not (out / RUN / "checkpoints").exists()


def test_sigint_checkpoints_the_current_step_then_resume_is_bit_exact(
    store_path, reference, tmp_path
):
    out = tmp_path / "out"
    proc = start_slow_train(store_path, out, delay=0.15)
    try:
        wait_for_checkpoint_and_progress(proc, out / RUN)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert "--resume" in output
    # nothing lost: the last logged step is covered by a checkpoint written on Ctrl-C
    last = max(ckpt.list_checkpoints(out / RUN))
    assert last >= max(logged_steps(out / RUN))
    assert last < STEPS

    result = CliRunner().invoke(_app(), train_args(store_path, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert_same_weights(reference, out / RUN)
    assert_same_metrics(reference, out / RUN)


# ------------------------------------------------------------------ in-process interrupts
BATCH_TOPK = {
    "architecture": "batch_topk",
    "d_sae": 64,
    "k": 3,
    "threshold_start_step": 4,
    "dead_tokens_threshold": 1024,
}


def cfg() -> TrainConfig:
    return TrainConfig(
        steps=STEPS, batch_size=128, warmup_steps=4, checkpoint_every=8, log_every=2,
        device="cpu", lr=3e-3,
    )  # fmt: skip


def runs() -> list[RunSpec]:
    return [RunSpec("a", BATCH_TOPK, None, 0), RunSpec("b", {**BATCH_TOPK, "k": 4}, None, 1)]


@pytest.fixture(scope="module")
def full(store_path, tmp_path_factory) -> Path:
    from masksae.train.sweep import open_store

    out = tmp_path_factory.mktemp("full") / "out"
    Trainer(open_store(store_path), runs(), cfg(), out, progress=False).train()
    return out


def test_keyboard_interrupt_checkpoints_the_current_step(store_path, full, tmp_path):
    from masksae.train.sweep import open_store

    store = open_store(store_path)

    def interrupt_at_13(step: int) -> None:
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(
            store, runs(), cfg(), tmp_path / "o", progress=False, on_step=interrupt_at_13
        ).train()
    for name in ("a", "b"):  # step 13 is not a periodic checkpoint step (every 8)
        assert 13 in ckpt.list_checkpoints(tmp_path / "o" / name)
    summary = Trainer(store, runs(), cfg(), tmp_path / "o", resume=True, progress=False).train()
    assert summary.steps_this_session == STEPS - 13  # nothing recomputed, nothing lost
    for name in ("a", "b"):
        assert_same_weights(full / name, tmp_path / "o" / name)
        assert_same_metrics(full / name, tmp_path / "o" / name)


def test_interrupt_in_the_middle_of_a_step_falls_back_to_the_last_checkpoint(
    store_path, full, tmp_path, monkeypatch
):
    from masksae.train import trainer
    from masksae.train.sweep import open_store

    store = open_store(store_path)
    step_fn = trainer._Run.step

    def step_then_interrupt(self, x, step, *args, **kwargs):
        if step == 12 and self.spec.name == "b":  # run a stepped to 13, b did not
            raise KeyboardInterrupt
        return step_fn(self, x, step, *args, **kwargs)

    monkeypatch.setattr(trainer._Run, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        Trainer(store, runs(), cfg(), tmp_path / "o", progress=False).train()
    monkeypatch.setattr(trainer._Run, "step", step_fn)
    for name in ("a", "b"):  # an inconsistent state is never checkpointed
        assert sorted(ckpt.list_checkpoints(tmp_path / "o" / name)) == [8]
    summary = Trainer(store, runs(), cfg(), tmp_path / "o", resume=True, progress=False).train()
    assert summary.steps_this_session == STEPS - 8
    for name in ("a", "b"):
        assert_same_weights(full / name, tmp_path / "o" / name)
        assert_same_metrics(full / name, tmp_path / "o" / name)


def test_partial_checkpoint_of_a_killed_writer_is_cleaned_on_resume(store_path, tmp_path):
    from masksae.train.sweep import open_store

    store = open_store(store_path)
    spec = [RunSpec("a", BATCH_TOPK, None, 0)]

    def crash(step: int) -> None:
        if step == 10:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        Trainer(store, spec, cfg(), tmp_path / "o", progress=False, on_step=crash).train()
    partial = tmp_path / "o" / "a" / "checkpoints" / ".step-000000016.tmp-999999"
    partial.mkdir()
    (partial / "sae.safetensors").write_bytes(b"torn")
    seen: list[bool] = []
    Trainer(
        store, spec, cfg(), tmp_path / "o", resume=True, progress=False,
        on_step=lambda step: seen.append(partial.exists()),
    ).train()  # fmt: skip
    assert seen and not any(seen)
