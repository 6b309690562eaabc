"""Command line of the trainer (``training/main.py --help`` documents every flag)."""
from __future__ import annotations

import argparse
import json


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="training/main.py",
        usage="torchrun [--nproc_per_node N] training/main.py [options]",
        description=(
            "Train a SPARO CLIP (or a plain OpenCLIP baseline) with bf16 FSDP2 on webdataset shards. "
            "With no --train-data a synthetic compositional image-text set (coloured shapes in "
            "spatial relations) is generated once, cached, and used for training and evaluation."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ViT-Tiny-SPARO",
                   help="model name: a sparo_fast.clip config (e.g. ViT-Tiny-SPARO, ViT-B-32-SPARO) or a plain "
                        "OpenCLIP name (e.g. ViT-Tiny, ViT-B-32) for the baseline CLIP")
    g.add_argument("--override-model-config", type=_json_dict, default=None, metavar="JSON",
                   help="JSON object merged into the model config, e.g. '{\"vision_cfg\": {\"layers\": 2}}'")
    g.add_argument("--fused-sparo", action="store_true",
                   help="use the fused SPARO kernels (Triton on GPU, absorbed torch math elsewhere); "
                        "without it the reference backend runs")
    g.add_argument("--max-params", type=int, default=None,
                   help="refuse to train a model with more parameters than this (the published recipe uses "
                        "151277313)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each residual block in the backward pass (less activation memory)")

    g = p.add_argument_group("data")
    g.add_argument("--train-data", default=None,
                   help="webdataset shard URLs with brace expansion (e.g. 'data/train-{000..099}.tar'); several "
                        "sources joined by '::'. Default: the built-in synthetic set")
    g.add_argument("--train-num-samples", type=int, default=None,
                   help="samples per epoch (required for --train-data unless the shard folder has sizes.json)")
    g.add_argument("--val-data", default=None,
                   help="evaluation shards (webdataset; a 'json' field with 'neg_caption'/'color'/'shape' enables "
                        "the swap and zero-shot metrics). Default: the synthetic evaluation split when training "
                        "on synthetic data")
    g.add_argument("--imagenet-val", default=None, metavar="DIR",
                   help="ImageNet validation set as an ImageFolder tree (1000 class folders): zero-shot top-1/top-5")
    g.add_argument("--workers", type=int, default=1, help="data loader worker processes per rank")
    g.add_argument("--data-cache-dir", default="data_cache",
                   help="where the synthetic data set is generated (once, atomically)")
    g.add_argument("--synthetic-train-samples", type=int, default=8000,
                   help="size of the generated training split")
    g.add_argument("--synthetic-val-samples", type=int, default=1000,
                   help="size of the generated evaluation split")
    g.add_argument("--synthetic-shard-size", type=int, default=1000, help="samples per generated shard")
    g.add_argument("--shuffle-buffer", type=int, default=1000,
                   help="sample shuffle buffer per worker (0: no sample shuffling)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="batch size per rank (per micro-batch)")
    g.add_argument("--accum-freq", type=int, default=1,
                   help="micro-batches per optimizer step; negatives span the whole accumulated batch")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (not on gains, biases, embeddings, "
                                                          "logit_scale)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2")
    g.add_argument("--eps", type=float, default=1e-6, help="AdamW epsilon")
    g.add_argument("--warmup", type=int, default=50, help="linear warm-up steps before the cosine decay")
    g.add_argument("--epochs", type=int, default=3, help="passes over --train-num-samples samples")
    g.add_argument("--grad-clip-norm", type=float, default=None, help="clip the global gradient norm")
    g.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="bf16: FSDP2 mixed precision (bf16 compute, fp32 reduce and master weights); default bf16 "
                        "on CUDA, fp32 on CPU")
    g.add_argument("--local-loss", action="store_true",
                   help="each rank computes the loss of its own rows against all gathered features")
    g.add_argument("--gather-with-grad", action="store_true",
                   help="gather features with gradient (exact gradients with --local-loss)")
    g.add_argument("--seed", type=int, default=0,
                   help="initial weights, data order and augmentations are functions of the seed")

    g = p.add_argument_group("run, logs and checkpoints")
    g.add_argument("--logs", "--logs-dir", dest="logs", default="logs",
                   help="root folder of runs. Under torchrun write --logs-dir (or put '--' before the trainer's "
                        "flags): recent torchrun versions reject --logs as an ambiguous prefix of their "
                        "--logs-specs")
    g.add_argument("--name", default=None, help="run name (folder under --logs); default from the model and time")
    g.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="'latest' (newest complete checkpoint of this run) or a checkpoint folder")
    g.add_argument("--save-frequency", type=int, default=1, help="save a checkpoint every N epochs (0: never)")
    g.add_argument("--save-every-n-steps", type=int, default=0,
                   help="also save a checkpoint every N optimizer steps (0: never)")
    g.add_argument("--keep-checkpoints", type=int, default=2,
                   help="step checkpoints kept (older ones are deleted; epoch-end ones too)")
    g.add_argument("--no-export", action="store_true", help="skip the single-file state dict export at the end")
    g.add_argument("--zeroshot-frequency", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    g.add_argument("--no-eval", action="store_true", help="skip evaluation entirely")
    g.add_argument("--log-every-n-steps", type=int, default=20, help="progress line every N optimizer steps")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for the model-FLOP-utilisation figure; default: a table for "
                        "known GPUs, an estimate for CPUs (threads x 2.5 GHz x 32 FLOP/cycle)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when available (NCCL), else CPU (gloo)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (the schedule still spans all epochs)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank (default: cores / ranks)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    import sys

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # torchrun ... main.py -- --logs DIR: torchrun keeps the separator
        argv = argv[1:]
    args = parser.parse_args(argv)
    if min(args.batch_size, args.accum_freq, args.epochs, args.log_every_n_steps) < 1:
        parser.error("--batch-size, --accum-freq, --epochs and --log-every-n-steps must be positive")
    if args.workers < 0 or args.save_every_n_steps < 0 or args.save_frequency < 0:
        parser.error("--workers, --save-every-n-steps and --save-frequency cannot be negative")
    if args.train_data is not None and args.train_num_samples is not None and args.train_num_samples < 1:
        parser.error("--train-num-samples must be positive")
    if args.resume is not None and args.name is None and args.resume == "latest":
        parser.error("--resume latest needs --name (the run to continue)")
    return args
