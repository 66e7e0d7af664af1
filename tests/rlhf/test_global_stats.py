"""Whitening and RS pooling over the whole data-parallel batch (issue 15)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from collective_run import SPLIT, global_batch
from paths import ROOT

from llama2_lightning.rlhf.global_stats import (
    global_masked_moments,
    global_masked_whiten,
    global_whiten_rewards,
    lockstep_batches,
)
from llama2_lightning.rlhf.masking import masked_whiten


def test_one_process_equals_masked_whiten() -> None:
    rewards, adv, mask = global_batch()
    torch.testing.assert_close(global_masked_whiten(adv, mask), masked_whiten(adv, mask))
    torch.testing.assert_close(global_whiten_rewards(rewards, shift_mean=False),
                               masked_whiten(rewards, torch.ones(10, dtype=torch.bool), shift_mean=False))
    mean, var, n = global_masked_moments(rewards, torch.ones(10, dtype=torch.bool))
    assert n == 10
    torch.testing.assert_close(mean, rewards.mean())
    torch.testing.assert_close(var, rewards.var())  # unbiased, as torch.var
    with pytest.raises(ValueError, match="no rank's mask selects"):
        global_masked_moments(rewards, torch.zeros(10, dtype=torch.bool))


def test_lockstep_batches_one_process() -> None:
    assert lockstep_batches([1, 2, 3], 2) == [([1, 2], 1.0), ([3], 1.0)]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        lockstep_batches([1], 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_whiten_like_one_and_uneven_pools_do_not_hang() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "collective_run.py")], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]  # a hang fails here instead of blocking CI
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    ranks = {r["rank"]: r for r in (json.loads(o[0].strip().splitlines()[-1]) for o in outs)}

    rewards, adv, mask = global_batch()
    expected_r = masked_whiten(rewards, torch.ones(10, dtype=torch.bool), shift_mean=False)
    expected_a = masked_whiten(adv, mask)
    for rank, rows in SPLIT.items():
        torch.testing.assert_close(torch.tensor(ranks[rank]["rewards"]), expected_r[rows])
        torch.testing.assert_close(torch.tensor(ranks[rank]["advantages"]), expected_a[rows])
        # per-rank whitening, the old behaviour, is not the same thing
        assert not torch.allclose(masked_whiten(adv[rows], mask[rows]), expected_a[rows], atol=1e-3)

    # 3 rows and 7 rows in batches of 2: both ranks ran 4 forward/backward passes
    assert ranks[0]["train_steps"] == ranks[1]["train_steps"] == 4
    for r in ranks.values():  # sharded decoding: rank 0 stops at step 1, rank 1 runs on; same samples
        assert r["gathered"] is False
        assert r["samples"] == r["expected"]
    assert len(ranks[0]["samples"][0]) == 1
