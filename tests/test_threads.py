"""OpenMP defaults: applied before torch is imported by the CLI, never over a user's value."""

from __future__ import annotations

import os
import subprocess
import sys

from masksae.threads import THREAD_ENV_DEFAULTS, apply_thread_env_defaults


def test_defaults_fill_only_what_is_missing():
    # a user's wait setting, either variable, wins over both defaults
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(mine)
        assert apply_thread_env_defaults(env) == {}
        assert env == mine
    env = {}
    assert apply_thread_env_defaults(env) == THREAD_ENV_DEFAULTS
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}


SPY = """
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Spy())
import masksae.cli
import torch
print(seen[0])
"""


def _policy_when_torch_is_imported(extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV_DEFAULTS}
    env.update(extra)
    out = subprocess.run(
        [sys.executable, "-c", SPY], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_cli_sets_the_wait_policy_before_torch_is_imported():
    # (a user's own value is kept: test_defaults_fill_only_what_is_missing)
    assert _policy_when_torch_is_imported({}) == "PASSIVE"
