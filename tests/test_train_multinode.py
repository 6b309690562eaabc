"""Multi-node HSDP on the CPU: 4 ranks as 2 "nodes" x 2 (two torchrun launches with --nnodes 2 on localhost,
gloo) train with --fsdp-replicate 2 (a 2-D mesh: replicated across nodes, sharded within) and checkpoint; the
checkpoint resumes on another mesh (one node of 4 ranks, 1-D FSDP) bit-exactly: weights and optimizer state."""
import json
import socket
import subprocess

import torch

from train_utils import MAIN, TORCHRUN, env, shared_once, tiny_args, torchrun

FLAGS = ["--model", "ViT-Tiny", "--no-eval", "--synthetic-train-samples", "128", "--synthetic-val-samples", "64",
         "--workers", "1", "--warmup", "2"]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args, timeout=400):
    port = _port()
    base = [a for a in TORCHRUN if a != "--standalone"]
    procs = [subprocess.Popen(base + ["--nnodes", "2", "--node-rank", str(i), "--nproc-per-node", "2",
                                      "--master-addr", "127.0.0.1", "--master-port", str(port), str(MAIN)]
                              + [str(a) for a in args], env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return outs[0]


def test_hsdp_two_nodes_then_resume_on_one_node_bit_exactly(tmp_path, tmp_path_factory):
    from sparo_fast_training import synthetic

    cache = str(shared_once(tmp_path_factory, "data_cache", lambda d: None))
    synthetic.ensure_synthetic(cache, 128, 64, seed=0, log=lambda *_: None, shard_size=1000)  # before both nodes
    out = two_nodes(tiny_args(tmp_path, "hsdp", cache, *FLAGS, "--epochs", "2", "--fsdp-replicate", "2"))
    assert "HSDP 2 x 2" in out and "4 rank(s)" in out
    run = tmp_path / "hsdp"
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in train if r["kind"] == "train"]
    assert len(losses) == 8 and all(x == x for x in losses)  # 128 / (4 x 8) = 4 steps per epoch
    # another mesh: one node, 4 ranks, 1-D FSDP; resume at the epoch-1 checkpoint with nothing left to train, so
    # the file written is the resharded state itself
    torchrun(4, MAIN, tiny_args(tmp_path, "flat", cache, *FLAGS, "--epochs", "1", "--resume",
                                run / "checkpoints" / "step_00000004"), timeout=400)
    a = torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)
    b = torch.load(tmp_path / "flat" / "checkpoints" / "epoch_1.pt", weights_only=True)
    for part in ("state_dict", "optimizer"):
        fa, fb = _flat(a[part]), _flat(b[part])
        assert fa.keys() == fb.keys() and fa, part
        for k in fa:
            assert torch.equal(fa[k], fb[k]) if torch.is_tensor(fa[k]) else fa[k] == fb[k], (part, k)


def _flat(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}/{i}"))
    else:
        out[prefix] = tree
    return out
