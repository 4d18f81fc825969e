"""Speed defaults (docs/benchmarks.md) that a later edit could silently undo; the speed figures are benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys

from stella_cli.cli import OPENMP_DEFAULTS, set_openmp_defaults


def test_openmp_defaults_apply_only_when_the_user_chose_no_wait_policy():
    env: dict[str, str] = {}
    set_openmp_defaults(env)
    assert env == {"GOMP_SPINCOUNT": "1000"} == OPENMP_DEFAULTS
    for user in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        env = dict(user)
        set_openmp_defaults(env)
        assert env == user  # the user's choice wins, nothing added


def test_the_cli_sets_them_before_torch_loads():
    """libgomp reads its environment once, when torch loads: cli.py must not import torch at module level."""
    code = ("import sys, stella_cli.cli as c; assert 'torch' not in sys.modules, 'cli imports torch'; "
            "c.set_openmp_defaults(); import torch, os; print(os.environ['GOMP_SPINCOUNT'], torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["1000", "1"]  # the spin count is set; the thread count stays the user's (or torch's default)
