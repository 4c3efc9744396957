"""Data-parallel training on CPU (gloo, 2 processes): ranks draw different episodes and end with identical weights,
both through torch.multiprocessing and through the `torchrun … -m metalign train` command that the rule runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from test_variants import FAST, planted_pair

from metalign.functions.codes import write_codes
from metalign.io import write_h5
from metalign.train.checkpoint import plain_state_dict
from metalign.train.loop import train

CONFIG = {**FAST, "steps": 30, "eval_every": 10, "checkpoint_every": 10}


def _rank(rank: int, world: int, port: int, folder: str) -> None:
    # the ranks join the parent's store as clients, as under torchrun's agent: no rank binds a port of its own
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    torch.set_num_threads(1)
    data = planted_pair()
    (xt, ct), (xv, cv) = data["train"], data["val"]
    result = train(CONFIG, xt, ct, xv, cv, f"{folder}/m.pt", f"{folder}/m.csv")
    torch.save(plain_state_dict(result.model), f"{folder}/rank{rank}.pt")


def test_two_ranks_draw_different_episodes_and_agree_on_weights(tmp_path):
    # the store listens on a port the OS picked and stays open throughout: no window for another process to take it
    store = torch.distributed.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    torch.multiprocessing.spawn(_rank, args=(2, store.port, str(tmp_path)), nprocs=2, join=True)
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["batch_per_rank"] == CONFIG["batch_size"] // 2
    hashes = ckpt["first_batch_sha256"]
    assert len(hashes) == 2 and hashes[0] != hashes[1]  # docs/methods.md P-15: each rank its own episodes
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    metrics = pd.read_csv(tmp_path / "m.csv")
    assert list(metrics[metrics.split == "val"].step) == [10, 20, 30]
    assert not (tmp_path / "m.last.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "m.pt", "rank0.pt", "rank1.pt"]


def test_torchrun_command(tmp_path):
    data = planted_pair()
    paths = {}
    for split, (features, codes) in data.items():
        write_h5(tmp_path / f"{split}_x.h5", {"features": features.values}, features.ids, {})
        write_codes(tmp_path / f"{split}_c.h5", codes.ids, codes.indices, codes.values, 12, 20, 20, {})
        paths[split] = (tmp_path / f"{split}_x.h5", tmp_path / f"{split}_c.h5")
    params = json.dumps({**CONFIG, "steps": 10, "gpus": 2})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "metalign", "train", "--train-features", str(paths["train"][0]),
               "--train-codes", str(paths["train"][1]), "--val-features", str(paths["val"][0]),
               "--val-codes", str(paths["val"][1]), "--params", params, "--out-ckpt", str(tmp_path / "m.pt"),
               "--out-metrics", str(tmp_path / "m.csv"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(set(ckpt["first_batch_sha256"])) == 2
    assert np.isfinite(pd.read_csv(tmp_path / "m.csv").loss).all()


def test_batch_must_split_evenly(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: None)
    data = planted_pair()
    (xt, ct), (xv, cv) = data["train"], data["val"]
    with pytest.raises(ValueError, match="batch_size 32 is not divisible by the 3 ranks"):
        train(CONFIG, xt, ct, xv, cv, tmp_path / "m.pt", tmp_path / "m.csv")
