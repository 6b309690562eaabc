"""Command line of the trainer (``training/main.py --help`` documents every flag).

The flags are OpenCLIP's (``open_clip_train.params``) with OpenCLIP's meaning, plus this project's
(training/configs.py lists the refused OpenCLIP flags with their reasons, the defaults that differ
and the project-only flags; tests/test_train_cli.py checks those tables against open_clip_train).
"""
from __future__ import annotations

import argparse
import ast
import json
import signal
import sys

from . import configs


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


class _KeyValues(argparse.Action):
    """``--aug-cfg scale='(0.9, 1.0)' color_jitter=0.4`` -> dict (values as Python literals), as OpenCLIP."""

    def __call__(self, parser, namespace, values, option_string=None):
        kw = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"{option_string}: expected key=value, got {item!r}")
            try:
                kw[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kw[key] = value
        setattr(namespace, self.dest, kw)


class _Refused(argparse.Action):
    """An OpenCLIP flag that cannot apply here: stop with one line saying why."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"error: {option_string}: {configs.REFUSED[option_string]}\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block (the usage is in --help)
        self.exit(2, f"error: {message}\n")


def _add_refused(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("OpenCLIP flags refused here (each stops with one line saying why)")
    for flag, why in configs.REFUSED.items():
        g.add_argument(flag, action=_Refused, nargs="?", help=why)


def _model_flags(p):
    d = configs.DEFAULTS
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d["--model"][0],
                   help="model name: a sparo_fast.clip config (e.g. ViT-Tiny-SPARO, ViT-B-32-SPARO) or a plain "
                        "OpenCLIP name (e.g. ViT-Tiny, ViT-B-32) for the baseline CLIP")
    g.add_argument("--override-model-config", type=_json_dict, default=None, metavar="JSON",
                   help="JSON object merged into the model config, e.g. '{\"vision_cfg\": {\"layers\": 2}}'")
    g.add_argument("--fused-sparo", action="store_true",
                   help="use the fused SPARO kernels (Triton on GPU, absorbed torch math elsewhere); "
                        "without it the reference backend runs")
    g.add_argument("--pretrained", default="", metavar="PATH",
                   help="initial weights: a local checkpoint file (published or exported layout, torch or "
                        ".safetensors) or hf-hub:ORG/NAME (OpenCLIP's Hugging Face name, resolved by OpenCLIP; "
                        "HF_HUB_OFFLINE=1 uses the local cache only); OpenCLIP's download tags are not supported")
    g.add_argument("--max-params", type=int, default=None,
                   help="refuse to train a model with more parameters than this (the published recipe uses "
                        "151277313)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each residual block in the backward pass (less activation memory)")
    g.add_argument("--torchcompile", action="store_true", help="torch.compile the model (in place)")
    g.add_argument("--lock-image", action="store_true", help="lock the image tower (no gradients)")
    g.add_argument("--lock-image-unlocked-groups", type=int, default=0,
                   help="leave the last N layer groups of the image tower unlocked (the read-out is the last)")
    g.add_argument("--lock-image-freeze-bn-stats", action="store_true",
                   help="freeze BatchNorm statistics of locked layers (ViT towers have none)")
    g.add_argument("--lock-text", action="store_true", help="lock the text tower (no gradients)")
    g.add_argument("--lock-text-unlocked-layers", type=int, default=0,
                   help="leave the last N layers of the text tower unlocked (the read-out with them)")
    g.add_argument("--lock-text-freeze-layer-norm", action="store_true",
                   help="OpenCLIP's flag: LayerNorms are locked like other weights")
    g.add_argument("--force-context-length", type=int, default=None, help="override the text context length")
    g.add_argument("--force-image-size", type=int, nargs="+", default=None, help="override the image size")
    g.add_argument("--force-quick-gelu", action="store_true", help="use QuickGELU activations")
    g.add_argument("--force-patch-dropout", type=float, default=None, help="override the patch dropout rate")
    g.add_argument("--image-mean", type=float, nargs="+", default=None, metavar="MEAN",
                   help="override the per-channel image mean of the preprocessing")
    g.add_argument("--image-std", type=float, nargs="+", default=None, metavar="STD",
                   help="override the per-channel image std of the preprocessing")
    g.add_argument("--image-interpolation", choices=["bicubic", "bilinear", "random"], default=None,
                   help="override the resize interpolation")
    g.add_argument("--image-resize-mode", choices=["shortest", "longest", "squash"], default=None,
                   help="override the resize mode")
    g.add_argument("--aug-cfg", nargs="*", default={}, action=_KeyValues, metavar="KEY=VALUE",
                   help="OpenCLIP training augmentation settings, e.g. scale='(0.9, 1.0)'")


def _data_flags(p):
    g = p.add_argument_group("data")
    g.add_argument("--train-data", default=None,
                   help="webdataset shard URLs with brace expansion (e.g. 'data/train-{000..099}.tar'); several "
                        "sources joined by '::'. Default: the built-in synthetic set")
    g.add_argument("--train-data-upsampling-factors", default=None,
                   help="with --dataset-resampled: one weight per '::' source (e.g. 1::2), shards drawn in proportion")
    g.add_argument("--train-num-samples", type=int, default=None,
                   help="samples per epoch (required for --train-data unless the shard folder has sizes.json)")
    g.add_argument("--dataset-type", choices=["webdataset", "csv", "synthetic", "auto"], default="auto",
                   help="webdataset (or auto) only")
    g.add_argument("--dataset-resampled", action="store_true",
                   help="draw each epoch's shards with replacement (seeded by --seed and the epoch)")
    g.add_argument("--val-data", default=None,
                   help="evaluation shards (webdataset; a 'json' field with 'neg_caption'/'color'/'shape' enables "
                        "the swap and zero-shot metrics). Default: the synthetic evaluation split when training "
                        "on synthetic data")
    g.add_argument("--val-num-samples", type=int, default=None,
                   help="OpenCLIP's size of --val-data (informative: the whole set is always evaluated, as there)")
    g.add_argument("--imagenet-val", default=None, metavar="DIR",
                   help="ImageNet validation set as an ImageFolder tree (1000 class folders): zero-shot top-1/top-5")
    g.add_argument("--cache-dir", default=None,
                   help="OpenCLIP's download cache; nothing is downloaded here (--pretrained is a local file)")
    g.add_argument("--workers", type=int, default=configs.DEFAULTS["--workers"][0],
                   help="data loader worker processes per rank")
    g.add_argument("--data-cache-dir", default="data_cache",
                   help="where the synthetic data set is generated (once, atomically)")
    g.add_argument("--synthetic-train-samples", type=int, default=8000, help="size of the generated training split")
    g.add_argument("--synthetic-val-samples", type=int, default=1000, help="size of the generated evaluation split")
    g.add_argument("--synthetic-shard-size", type=int, default=1000, help="samples per generated shard")
    g.add_argument("--shuffle-buffer", type=int, default=1000,
                   help="sample shuffle buffer per worker (0: no sample shuffling)")
    g.add_argument("--max-corrupt-fraction", type=float, default=0.1,
                   help="stop when more than this fraction of the samples a loader worker read (judged over at "
                        "least 100) are corrupt")
    g.add_argument("--data-timeout", type=float, default=600.0,
                   help="stop when the loader workers deliver no batch for this many seconds (0: wait forever; "
                        "with --workers 0 there is no limit)")


def _optim_flags(p):
    d = configs.DEFAULTS
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="batch size per rank (per micro-batch)")
    g.add_argument("--accum-freq", type=int, default=1,
                   help="micro-batches per optimizer step; negatives span the whole accumulated batch")
    g.add_argument("--opt", default="adamw", help="optimizer: adamw only")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 1e-3 on the built-in set, else OpenCLIP's for the model)")
    g.add_argument("--wd", type=float, default=d["--wd"][0],
                   help="AdamW weight decay (OpenCLIP's rule: not on parameters with < 2 dims or named "
                        "bn/ln/bias/logit_scale)")
    g.add_argument("--beta1", type=float, default=None, help="AdamW beta1 (default: OpenCLIP's for the model)")
    g.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (default: OpenCLIP's for the model)")
    g.add_argument("--eps", type=float, default=None, help="AdamW epsilon (default: OpenCLIP's for the model)")
    g.add_argument("--warmup", type=int, default=d["--warmup"][0], help="linear warm-up steps")
    g.add_argument("--epochs", type=int, default=d["--epochs"][0], help="passes over --train-num-samples samples")
    g.add_argument("--lr-scheduler", choices=["cosine", "const", "const-cooldown"], default="cosine",
                   help="open_clip_train.scheduler: cosine, constant, or constant with a final cooldown")
    g.add_argument("--skip-scheduler", action="store_true", help="keep the learning rate at --lr (no schedule)")
    g.add_argument("--epochs-cooldown", type=int, default=None,
                   help="const-cooldown: cool down over the last N epochs")
    g.add_argument("--lr-cooldown-power", type=float, default=1.0, help="const-cooldown: polynomial power")
    g.add_argument("--lr-cooldown-end", type=float, default=0.0, help="const-cooldown: final learning rate")
    g.add_argument("--grad-clip-norm", type=float, default=None, help="clip the global gradient norm")
    g.add_argument("--precision", default=None,
                   choices=["amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32"],
                   help="OpenCLIP's names mapped to FSDP2 mixed precision (table in training/README.md); amp is "
                        "fp16 autocast with a gradient scaler; fp16 and pure_fp16 are refused; default amp_bf16 on "
                        "CUDA, fp32 on CPU")
    g.add_argument("--local-loss", action="store_true",
                   help="each rank computes the loss of its own rows against all gathered features")
    g.add_argument("--gather-with-grad", action="store_true",
                   help="gather features with gradient (exact gradients with --local-loss)")
    g.add_argument("--fsdp-replicate", type=int, default=1, metavar="N",
                   help="HSDP: a 2-D device mesh (N replicas x world/N shards); parameters are sharded within a "
                        "group of world/N ranks (give the ranks per node) and replicated across the N groups")
    g.add_argument("--seed", type=int, default=0,
                   help="initial weights, data order and augmentations are functions of the seed")


def _run_flags(p):
    d = configs.DEFAULTS
    g = p.add_argument_group("run, logs and checkpoints")
    g.add_argument("--logs", "--logs-dir", dest="logs", default=d["--logs"][0],
                   help="root folder of runs. Under torchrun write --logs-dir (or put '--' before the trainer's "
                        "flags): recent torchrun versions reject --logs as an ambiguous prefix of their "
                        "--logs-specs")
    g.add_argument("--log-local", action="store_true", help="each node's local rank 0 also logs (out-RANK.log)")
    g.add_argument("--name", default=None, help="run name (folder under --logs); default from the model and time")
    g.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="'latest' (newest usable checkpoint of this run), a checkpoint folder, or an OpenCLIP "
                        "training checkpoint file (epoch_N.pt of open_clip_train or of this trainer)")
    g.add_argument("--save-frequency", type=int, default=1,
                   help="every N epochs (and at the last): a sharded checkpoint and OpenCLIP's epoch_N.pt (0: never)")
    g.add_argument("--save-most-recent", action="store_true",
                   help="checkpoint every epoch end and export checkpoints/epoch_latest.pt")
    g.add_argument("--delete-previous-checkpoint", action="store_true",
                   help="keep only the newest checkpoint (and the newest epoch export)")
    g.add_argument("--save-every-n-steps", type=int, default=0,
                   help="also save a checkpoint every N optimizer steps (0: never)")
    g.add_argument("--keep-checkpoints", type=int, default=2,
                   help="step checkpoints kept (older ones are deleted; epoch-end ones too)")
    g.add_argument("--no-export", action="store_true", help="skip the single-file state dict export at the end")
    g.add_argument("--zeroshot-frequency", type=int, default=d["--zeroshot-frequency"][0],
                   help="ImageNet zero-shot every N epochs and at the last (0: never), as OpenCLIP")
    g.add_argument("--val-frequency", type=int, default=1,
                   help="evaluate on --val-data every N epochs and at the last (0: never), as OpenCLIP")
    g.add_argument("--no-eval", action="store_true", help="skip evaluation entirely")
    g.add_argument("--log-every-n-steps", type=int, default=d["--log-every-n-steps"][0],
                   help="progress line every N optimizer steps")
    g.add_argument("--report-to", default="", help="comma list: tensorboard, wandb (offline without a network)")
    g.add_argument("--wandb-notes", default="", help="wandb run notes")
    g.add_argument("--wandb-project-name", default="open-clip", help="wandb project")
    g.add_argument("--debug", action="store_true", help="log at DEBUG level")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for the model-FLOP-utilisation figure; default: a table for "
                        "known GPUs; on CPUs MFU is left out unless this is given")
    g.add_argument("--device", default=d["--device"][0],
                   help="auto, cpu, cuda: CUDA when available (NCCL), else CPU (gloo)")
    g.add_argument("--dist-backend", choices=["nccl", "gloo"], default=None,
                   help="process group backend (default nccl on CUDA, gloo on CPU)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (the schedule still spans all epochs)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank (default: cores / ranks)")
    g.add_argument("--preempt-signal", choices=["SIGTERM", "SIGUSR1", "none"], default="SIGTERM",
                   help="on this signal every rank finishes its step, a checkpoint is written and the run exits "
                        "with status 3 (continue with --resume latest)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="training/main.py",
        usage="torchrun [--nproc_per_node N] training/main.py [options]",
        description=(
            "Train a SPARO CLIP (or a plain OpenCLIP baseline) with FSDP2 on webdataset shards, with "
            "OpenCLIP's command line. With no --train-data a synthetic compositional image-text set (coloured "
            "shapes in spatial relations) is generated once, cached, and used for training and evaluation."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_flags(p)
    _data_flags(p)
    _optim_flags(p)
    _run_flags(p)
    _add_refused(p)
    return p


def _check(parser, args) -> None:
    for (flag, value), why in configs.REFUSED_VALUES.items():
        if getattr(args, flag[2:].replace("-", "_")) == value:
            parser.error(f"{flag} {value}: {why}")
    if min(args.batch_size, args.accum_freq, args.epochs, args.log_every_n_steps) < 1:
        parser.error("--batch-size, --accum-freq, --epochs and --log-every-n-steps must be positive")
    if min(args.workers, args.save_every_n_steps, args.save_frequency) < 0:
        parser.error("--workers, --save-every-n-steps and --save-frequency cannot be negative")
    if args.train_data is not None and args.train_num_samples is not None and args.train_num_samples < 1:
        parser.error("--train-num-samples must be positive")
    if args.resume == "latest" and args.name is None:
        parser.error("--resume latest needs --name (the run to continue)")
    if args.opt != "adamw":
        parser.error(f"--opt {args.opt}: only adamw is supported")
    if args.device not in ("auto", "cpu", "cuda"):
        parser.error(f"--device {args.device}: choose auto, cpu or cuda (torchrun sets the rank's GPU)")
    if args.lr_scheduler == "const-cooldown" and args.epochs_cooldown is None:
        parser.error("--lr-scheduler const-cooldown needs --epochs-cooldown")
    if args.train_data_upsampling_factors and not args.dataset_resampled:
        parser.error("--train-data-upsampling-factors needs --dataset-resampled")
    if args.pretrained and args.pretrained.lower() != "none" and not args.pretrained.startswith("hf-hub:") \
            and not _is_file(args.pretrained):
        parser.error(f"--pretrained {args.pretrained}: not a file (OpenCLIP's download tags are not supported; "
                     "give a local checkpoint, a .safetensors file or hf-hub:ORG/NAME from the local cache)")
    if args.dataset_type == "auto":
        for flag, spec in (("--train-data", args.train_data), ("--val-data", args.val_data)):
            ext = (spec or "").split("::")[0].rsplit(".", 1)[-1].lower()
            if ext in ("csv", "tsv"):
                parser.error(f"{flag} {spec}: --dataset-type auto reads a .{ext} file as a csv data set (as "
                             f"OpenCLIP does), and csv data sets are not supported here; give webdataset shards")
    if args.fsdp_replicate < 1:
        parser.error("--fsdp-replicate must be at least 1")
    if not 0.0 <= args.max_corrupt_fraction <= 1.0 or args.data_timeout < 0:
        parser.error("--max-corrupt-fraction must lie in [0, 1] and --data-timeout cannot be negative")
    bad = sorted(set(args.report_to.split(",")) - {"", "tensorboard", "wandb", "all"})
    if bad:
        parser.error(f"--report-to {','.join(bad)}: choose tensorboard, wandb or all")
    for flag in ("image_mean", "image_std"):
        v = getattr(args, flag)
        if v is not None and len(v) not in (1, 3):
            parser.error(f"--{flag.replace('_', '-')}: give 1 or 3 values")


def _is_file(path: str) -> bool:
    import os

    return os.path.isfile(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # torchrun ... main.py -- --logs DIR: torchrun keeps the separator
        argv = argv[1:]
    args = parser.parse_args(argv)
    _check(parser, args)
    args.preempt_signal = None if args.preempt_signal == "none" else getattr(signal, args.preempt_signal)
    return args
