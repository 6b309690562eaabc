"""Paired whole-process runs: this trainer vs OpenCLIP's own ``open_clip_train`` on the same shards.

Setting: the built-in synthetic shards (8000 samples, 8 shards), one epoch, batch 64,
fp32, one CPU process, plain CLIP ``ViT-Tiny`` (this package's config, registered with OpenCLIP for
``open_clip_train``), one loader worker, no evaluation, no checkpoints. Runs alternate (ours, theirs,
ours, ...) so that a load change on the machine hits both; the figure is the median of the per-pair
wall-time ratios (and of the CPU-time ratios: user + system of the process and its children).

``open_clip_train`` reads webdataset shards only with a webdataset 0.2.x (1.0 fails with
``KeyError: 'fname'``) and needs pandas; install it apart and pass it with ``--oc-path``:

    pip install --target /tmp/oc_target webdataset==0.2.86      # (remove the numpy it pulls in)
    python bench/trainer/trainer_vs_openclip.py --pairs 3 --oc-path /tmp/oc_target

Not a test: it takes minutes. ``--steps N`` limits both to N steps (a quick look).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

OC_LAUNCHER = """
import sys, open_clip
open_clip.add_model_config({cfg!r})
from open_clip_train.main import main
main(sys.argv[1:])
"""


def ours_cmd(args, data_cache, logs, name):
    cmd = [sys.executable, str(REPO / "training" / "main.py"), "--device", "cpu", "--model", "ViT-Tiny",
           "--data-cache-dir", data_cache, "--synthetic-train-samples", str(args.samples),
           "--synthetic-val-samples", "64", "--synthetic-shard-size", "1000", "--batch-size", "64",
           "--epochs", "1", "--precision", "fp32", "--workers", "1", "--no-eval", "--save-frequency", "0",
           "--no-export", "--logs-dir", logs, "--name", name, "--lr", "5e-4", "--wd", "0.1", "--warmup", "10",
           "--log-every-n-steps", "100", "--seed", "0"]
    if args.steps:
        cmd += ["--max-steps", str(args.steps)]
    return cmd


def theirs_cmd(args, shards, logs, name):
    cfg = str(REPO / "sparo_fast" / "clip" / "model_configs" / "ViT-Tiny.json")
    n = args.samples if not args.steps else args.steps * 64
    return [sys.executable, "-c", OC_LAUNCHER.format(cfg=cfg), "--train-data", shards,
            "--train-num-samples", str(n), "--dataset-type", "webdataset", "--batch-size", "64",
            "--epochs", "1", "--precision", "fp32", "--workers", "1", "--model", "ViT-Tiny",
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--logs", logs,
            "--name", name, "--lr", "5e-4", "--wd", "0.1", "--warmup", "10", "--log-every-n-steps", "100",
            "--seed", "0", "--report-to", "", "--device", "cpu"]


def timed(cmd, env, log_path):
    """Wall and CPU seconds (the process and its children) of one run; its output goes to ``log_path``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if rc != 0:
        raise SystemExit(f"run failed ({rc}): {' '.join(cmd[:3])} ...; see {log_path}")
    return wall, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=None, help="stop both after this many steps")
    ap.add_argument("--oc-path", default="/tmp/oc_target", help="folder holding webdataset 0.2.x (pip --target)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "sparo_bench_trainer"))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / ".shim"))
    from sparo_fast_training import synthetic

    data_cache = os.path.join(args.work, "data")
    d = synthetic.ensure_synthetic(data_cache, args.samples, 64, shard_size=1000, log=print)
    base = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    shim = str(REPO / ".shim")
    env_ours = dict(base, PYTHONPATH=os.pathsep.join(p for p in (shim, base.get("PYTHONPATH")) if p))
    env_theirs = dict(base, PYTHONPATH=os.pathsep.join(p for p in (args.oc_path, shim, base.get("PYTHONPATH")) if p))
    rows = []
    for i in range(args.pairs):
        stamp = f"{i}-{time.time_ns()}"
        logs = os.path.join(args.work, "logs")
        w_o, c_o = timed(ours_cmd(args, data_cache, logs, f"ours-{stamp}"), env_ours,
                         os.path.join(args.work, f"ours-{stamp}.log"))
        w_t, c_t = timed(theirs_cmd(args, d["train"], logs, f"oc-{stamp}"), env_theirs,
                         os.path.join(args.work, f"oc-{stamp}.log"))
        rows.append({"ours_wall": w_o, "oc_wall": w_t, "ours_cpu": c_o, "oc_cpu": c_t})
        print(f"pair {i + 1}: ours {w_o:.1f} s wall / {c_o:.1f} s CPU, open_clip_train {w_t:.1f} s / {c_t:.1f} s "
              f"-> {w_o / w_t:.2f}x wall, {c_o / c_t:.2f}x CPU", flush=True)
    res = {"pairs": rows, "wall_ratio_median": statistics.median(r["ours_wall"] / r["oc_wall"] for r in rows),
           "cpu_ratio_median": statistics.median(r["ours_cpu"] / r["oc_cpu"] for r in rows),
           "ours_wall_median": statistics.median(r["ours_wall"] for r in rows),
           "oc_wall_median": statistics.median(r["oc_wall"] for r in rows), "cpus": os.cpu_count(),
           "loadavg_end": os.getloadavg()}
    print(f"median of {len(rows)} pairs: this trainer / open_clip_train = {res['wall_ratio_median']:.2f}x wall "
          f"({res['ours_wall_median']:.1f} s vs {res['oc_wall_median']:.1f} s), {res['cpu_ratio_median']:.2f}x CPU; "
          f"load average at the end {res['loadavg_end'][0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
