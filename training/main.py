"""sparo-fast trainer: ``torchrun --nproc_per_node N training/main.py --fused-sparo [flags]``.

bf16 FSDP2 (fully_shard on every residual block of both towers and on the root), webdataset input,
exactly resumable sharded checkpoints, evaluation with every rank taking part. With no
``--train-data`` a synthetic compositional set is generated once and used (see ``--help``).
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from typing import Any, Dict, List, Optional

import warnings

import torch
import torch.distributed as dist

from sparo_fast_training import checkpoint as ckpt
from sparo_fast_training import data as data_mod
from sparo_fast_training import distributed as D
from sparo_fast_training import evaluate as ev
from sparo_fast_training import flops as F
from sparo_fast_training import fsdp, logger, optim, synthetic
from sparo_fast_training.loop import make_loss, train_step
from sparo_fast_training.params import parse_args

log = logging.getLogger(logger.NAME)
# FSDP2 warns that the root returns views (the features); nothing here modifies them in place
warnings.filterwarnings("ignore", message=".*returned a view tensor.*")

TEST_HANG_ENV = "SPARO_TRAIN_TEST_HANG_AFTER_SAVE_AT_STEP"  # test hook: sleep after this step's save


class Fatal(Exception):
    """Stops the run with one clear line (exit status 2)."""


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)


def _count_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build_model(args, device):
    from sparo_fast.clip import create_model_and_transforms, get_tokenizer

    try:
        model, pre_train, pre_val = create_model_and_transforms(
            args.model, fused=args.fused_sparo, precision="fp32", device=device,
            override=args.override_model_config, output_dict=True)
    except (KeyError, ValueError, RuntimeError) as e:
        raise Fatal(f"cannot build model {args.model!r}: {e}") from None
    try:
        tokenizer = get_tokenizer(args.model if args.override_model_config is None else model.config)
    except Exception:
        from sparo_fast.clip import tokenizer_for

        tokenizer = tokenizer_for(model)
    return model, pre_train, pre_val, tokenizer


def resolve_data(args, info) -> Dict[str, Any]:
    out: Dict[str, Any] = {"val_urls": None}
    if args.train_data is None:
        # one generator per node (the cache is node-local); the others wait, then find it complete
        if info.local_rank == 0:
            d = synthetic.ensure_synthetic(args.data_cache_dir, args.synthetic_train_samples,
                                           args.synthetic_val_samples, seed=0, log=log.info,
                                           shard_size=args.synthetic_shard_size)
        dist.barrier()
        if info.local_rank != 0:
            d = synthetic.ensure_synthetic(args.data_cache_dir, args.synthetic_train_samples,
                                           args.synthetic_val_samples, seed=0, log=log.info,
                                           shard_size=args.synthetic_shard_size)
        out["train_urls"] = data_mod.expand_urls(d["train"])
        out["num_samples"] = args.train_num_samples or d["train_num_samples"]
        out["val_urls"] = data_mod.expand_urls(args.val_data or d["val"])
    else:
        out["train_urls"] = data_mod.expand_urls(args.train_data)
        if args.val_data:
            out["val_urls"] = data_mod.expand_urls(args.val_data)
    try:
        data_mod.check_shards(out["train_urls"], "--train-data")
        if out["val_urls"] is not None:
            data_mod.check_shards(out["val_urls"], "--val-data")
    except data_mod.DataError as e:
        raise Fatal(str(e)) from None
    if "num_samples" not in out:
        n = args.train_num_samples or data_mod.count_samples(out["train_urls"])
        if not n:
            raise Fatal("--train-data: give --train-num-samples (no sizes.json beside the shards)")
        out["num_samples"] = n
    return out


def run(args) -> int:
    info = D.init(args.device)
    device = info.device
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
    name = args.name or D.broadcast_object(f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = os.path.join(args.logs, name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    logger.setup(info.rank, os.path.join(run_dir, "out.log"))
    metrics = logger.MetricsWriter(run_dir, info.is_main)
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "params.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items()}, f, indent=1, default=str)
    log.info(f"run {name}: {info.world_size} rank(s), {info.backend} on {device.type}, precision {precision}, "
             f"model {args.model}")

    data = resolve_data(args, info)

    torch.manual_seed(args.seed)  # same initial weights on every rank (FSDP2 shards each rank's copy)
    model, pre_train, pre_val, tokenizer = build_model(args, device)
    n_params = _count_params(model)
    kind = (f"SPARO read-outs, {'fused' if args.fused_sparo else 'reference'} backend"
            if getattr(model, "readouts", None) else "baseline CLIP (no SPARO read-out)")
    if args.max_params is not None and n_params > args.max_params:
        raise Fatal(f"model {args.model} has {n_params:,} parameters, above --max-params {args.max_params:,}")
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    context_length = model.context_length
    embed_dim = model.embed_dim if hasattr(model, "embed_dim") else None
    try:
        fwd_flops = F.forward_flops_per_sample(model, image_size, context_length)
    except Exception as e:  # the FLOP figure is informative only
        log.warning(f"could not count model FLOPs ({e!r}); MFU will read 0")
        fwd_flops = 0.0
    fsdp.shard_model(model, device, info.world_size, precision, args.grad_checkpointing)
    optimizer = optim.create_optimizer(model, args.lr, args.wd, (args.beta1, args.beta2), args.eps)
    loss_fn = make_loss(args.local_loss, args.gather_with_grad, info.rank, info.world_size)

    global_batch = args.batch_size * args.accum_freq * info.world_size
    steps_per_epoch = data["num_samples"] // global_batch
    if steps_per_epoch < 1:
        raise Fatal(f"{data['num_samples']} samples per epoch is less than one global batch ({global_batch})")
    total_steps = steps_per_epoch * args.epochs
    nw = max(1, args.workers)
    log.info(f"{args.model}: {kind}, {n_params:,} parameters; {data['num_samples']:,} samples/epoch, "
             f"global batch {global_batch} "
             f"({info.world_size} x {args.batch_size} x {args.accum_freq} accum), {steps_per_epoch} steps/epoch, "
             f"{total_steps} steps, {len(data['train_urls'])} shards")

    # ------------------------------------------------------------------ resume
    step, epoch, step_in_epoch = 0, 0, 0
    positions: Optional[List[int]] = None
    skipped_ep: Optional[List[int]] = None
    skipped_before = 0
    resume_path = None
    if args.resume == "latest":
        resume_path = ckpt.latest(ckpt_dir)
        if resume_path is None:
            log.info(f"--resume latest: no complete checkpoint in {ckpt_dir}; starting from scratch")
    elif args.resume:
        resume_path = args.resume
        if not os.path.isfile(os.path.join(resume_path, "train_state.pt")):
            raise Fatal(f"--resume {resume_path}: not a complete checkpoint folder (no train_state.pt)")
    if resume_path is not None:
        blob = torch.load(os.path.join(resume_path, "train_state.pt"), weights_only=False)
        r0 = blob["ranks"][0]
        same_layout = (blob["world_size"] == info.world_size and r0["workers"] == nw
                       and r0["batch_size"] == args.batch_size and r0["accum_freq"] == args.accum_freq)
        if r0["step_in_epoch"] != 0 and not same_layout:
            raise Fatal(f"cannot resume {resume_path} mid-epoch with a different layout: it was written by "
                        f"{blob['world_size']} rank(s) x {r0['workers']} worker(s), batch {r0['batch_size']} x "
                        f"{r0['accum_freq']} accum; now {info.world_size} x {nw}, batch {args.batch_size} x "
                        f"{args.accum_freq} (resume at an epoch boundary, or with the same layout)")
        if r0["step_in_epoch"] != 0 and r0.get("seed", args.seed) != args.seed:
            raise Fatal(f"cannot resume {resume_path} mid-epoch with --seed {args.seed}: it was written with "
                        f"--seed {r0['seed']} (the data order depends on it)")
        ckpt.load(resume_path, model, optimizer)
        step, epoch, step_in_epoch = r0["step"], r0["epoch"], r0["step_in_epoch"]
        if same_layout:
            mine = blob["ranks"][info.rank]
            positions, skipped_ep = mine["positions"], mine["skipped"]
            skipped_before = mine["skipped_before"]
            ckpt.set_rng_state(mine["rng"])
        log.info(f"resumed from {resume_path}: step {step}, epoch {epoch}, step {step_in_epoch} of the epoch")

    peak = F.peak_tflops(device, precision, args.peak_tflops)
    step_flops = F.train_flops_per_step(fwd_flops, args.batch_size, args.accum_freq, global_batch,
                                        embed_dim or 0, args.local_loss)

    def train_state() -> Dict[str, Any]:
        return {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "positions": list(positions),
                "skipped": list(skipped_ep), "skipped_before": skipped_before, "rng": ckpt.rng_state(),
                "workers": nw, "batch_size": args.batch_size, "accum_freq": args.accum_freq, "seed": args.seed}

    current: Dict[str, Any] = {}

    def save() -> None:
        path = ckpt.save(ckpt_dir, step, model, optimizer, train_state(), keep=args.keep_checkpoints)
        log.info(f"saved checkpoint {path}")
        if os.environ.get(TEST_HANG_ENV) == str(step):
            # test hook: publish the pids of this rank and its loader workers, then wait to be killed
            pids = [os.getpid()] + [w.pid for w in getattr(current.get("loader"), "_workers", [])]
            with open(os.path.join(run_dir, f"test_hang_pids_rank{info.rank}.txt"), "w") as f:
                f.write(" ".join(map(str, pids)))
            while True:
                time.sleep(60)

    val_samples = None
    if not args.no_eval and data["val_urls"] is not None:
        val_samples = data_mod.load_eval_samples(data["val_urls"], pre_val, tokenizer, info.rank, info.world_size)
    dummy_image = torch.zeros(3, image_size, image_size)

    def evaluate(tag: str) -> Dict[str, float]:
        if args.no_eval:
            return {}
        model.eval()
        res: Dict[str, float] = {}
        t0 = time.time()
        if val_samples is not None:
            res.update(ev.evaluate_pairs(model, val_samples, tokenizer, args.batch_size * 2, device, dummy_image,
                                         context_length))
        if args.imagenet_val:
            res.update(ev.imagenet_zero_shot(model, tokenizer, args.imagenet_val, pre_val, args.batch_size * 2,
                                             args.workers, device, info.rank, info.world_size))
        model.train()
        if res:
            log.info(f"eval ({tag}, step {step}, {time.time() - t0:.1f}s): "
                     + "  ".join(f"{k} {v:.4f}" if v < 10 else f"{k} {v:.0f}" for k, v in res.items()))
            metrics.write("eval", step, {"epoch": epoch, **res})
        return res

    # ------------------------------------------------------------------ train
    model.train()
    t_start = time.time()
    last_eval: Dict[str, float] = {}
    stop = args.max_steps is not None and step >= args.max_steps
    while epoch < args.epochs and not stop:
        if positions is None or step_in_epoch == 0:
            positions, skipped_ep = [0] * nw, [0] * nw
        spec = data_mod.StreamSpec(
            urls=data["train_urls"], seed=args.seed, epoch=epoch, rank=info.rank, world_size=info.world_size,
            num_workers=args.workers, batch_size=args.batch_size, batches_per_rank=steps_per_epoch * args.accum_freq,
            start_batch=step_in_epoch * args.accum_freq, positions=list(positions), skipped=list(skipped_ep),
            shuffle_buffer=args.shuffle_buffer)
        loader = iter(data_mod.train_loader(spec, pre_train, tokenizer, pin_memory=device.type == "cuda"))
        current["loader"] = loader
        win_t, win_data, win_steps = time.time(), 0.0, 0
        while step_in_epoch < steps_per_epoch:
            t0 = time.time()
            micro = []
            for _ in range(args.accum_freq):
                images, texts, binfo = next(loader)
                w, pos, sk = binfo.tolist()
                positions[w], skipped_ep[w] = pos, sk
                micro.append((images.to(device, non_blocking=True), texts.to(device, non_blocking=True)))
            win_data += time.time() - t0
            lr = optim.cosine_lr(step, args.lr, args.warmup, total_steps)
            optim.set_lr(optimizer, lr)
            loss, gnorm = train_step(model, micro, loss_fn, optimizer, args.grad_clip_norm)
            step += 1
            step_in_epoch += 1
            win_steps += 1
            last = step_in_epoch == steps_per_epoch
            if args.max_steps is not None and step >= args.max_steps:
                stop = True
            if step % args.log_every_n_steps == 0 or last or stop or step == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.time() - win_t
                loss = loss.reshape(1).clone()
                dist.all_reduce(loss)  # mean over ranks (with --local-loss each holds its rows' loss)
                loss /= info.world_size
                sps = win_steps * global_batch / dt
                achieved = win_steps * step_flops / dt / 1e12  # per rank
                rec = {"epoch": epoch, "loss": loss.item(), "lr": lr, "samples_per_s": sps,
                       "data_time_pct": 100.0 * win_data / dt, "grad_norm": gnorm.item(),
                       "peak_mem_gb": _peak_memory_gb(device), "tflops_per_rank": achieved,
                       "mfu": achieved / peak if peak else None,
                       "logit_scale": float(model.logit_scale.full_tensor().exp().item())}
                log.info(f"epoch {epoch} step {step}/{total_steps} ({100.0 * step / total_steps:.0f}%) "
                         f"loss {rec['loss']:.4f} lr {lr:.3g} | {sps:.1f} samples/s | data {rec['data_time_pct']:.0f}% "
                         f"| grad-norm {rec['grad_norm']:.3f} | peak mem {rec['peak_mem_gb']:.2f} GB | "
                         + (f"MFU {100 * rec['mfu']:.1f}% " if rec["mfu"] is not None else "")
                         + f"({achieved:.3f} TFLOP/s/rank) | scale {rec['logit_scale']:.1f}")
                metrics.write("train", step, rec)
                win_t, win_data, win_steps = time.time(), 0.0, 0
            if args.save_every_n_steps and step % args.save_every_n_steps == 0 and not last:
                save()
            if stop:
                break
        del loader
        current.clear()
        if stop and step_in_epoch < steps_per_epoch:
            break
        epoch += 1
        step_in_epoch = 0
        skipped_before += sum(skipped_ep)
        positions, skipped_ep = [0] * nw, [0] * nw
        if args.save_frequency and (epoch % args.save_frequency == 0 or epoch == args.epochs):
            save()
        if epoch == args.epochs or (args.zeroshot_frequency and epoch % args.zeroshot_frequency == 0):
            last_eval = evaluate(f"epoch {epoch}")

    # ------------------------------------------------------------------ finish
    n_skipped = torch.tensor([skipped_before + sum(skipped_ep or [])], dtype=torch.long, device=device)
    dist.all_reduce(n_skipped)
    n_skipped = int(n_skipped.item())
    if stop and not last_eval:
        last_eval = evaluate("final")
    log.info(f"skipped {n_skipped} corrupt sample{'s' if n_skipped != 1 else ''}")
    export_path = None
    if not args.no_export:
        export_path = os.path.join(ckpt_dir, f"epoch_{epoch}.pt" if not stop else f"step_{step}.pt")
        ckpt.export(export_path, model, {"epoch": epoch, "step": step, "name": args.model,
                                         "model_config": getattr(model, "config", None)})
        log.info(f"exported {export_path}")
    summary = {"steps": step, "epoch": epoch, "skipped_samples": n_skipped, "wall_s": time.time() - t_start,
               "export": export_path, **last_eval}
    metrics.write("summary", step, summary)
    metrics.close()
    if info.is_main:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    log.info(f"done: {step} steps in {summary['wall_s']:.1f}s; logs in {run_dir}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except Fatal as e:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        D.cleanup()


if __name__ == "__main__":
    sys.exit(main())
