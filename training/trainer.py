"""The trainer: set-up, resume, the epoch loop, evaluation, checkpoints and the end of the run.

``Trainer`` orchestrates components whose state each lives in one place: ``datasetup.DataPlan`` (shards,
samples per epoch), ``ckpt_manager.CheckpointManager`` (sharded checkpoints, OpenCLIP's ``epoch_N.pt``,
exports, what ``--resume`` continues from) with the run's ``Position``, ``evaluator.Evaluator`` (OpenCLIP's
schedule, names and ``results.jsonl``) and ``progress.Progress`` (the progress line). Every attribute is
created in ``__init__``. Tests subclass it to hook a phase (tests/train_hang.py); nothing test-only lives here.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from . import data as data_mod
from . import datasetup
from . import distributed as D
from . import flops as F
from . import fsdp, logger, optim, pretrained, rundir
from .ckpt_manager import CheckpointManager, Position, Readers
from .errors import Fatal
from .evaluator import Evaluator, check_imagenet
from .loop import make_loss, train_step
from .progress import Plan, Progress, Window

log = logging.getLogger(logger.NAME)

PREEMPTED = 3  # exit status of a run stopped by --preempt-signal after writing its checkpoint
__all__ = ["Trainer", "Fatal", "PREEMPTED", "discard_failed_start", "model_override", "compile_model"]


def model_override(args) -> Optional[Dict[str, Any]]:
    """--override-model-config plus OpenCLIP's --force-* flags, as one config override."""
    o = json.loads(json.dumps(args.override_model_config or {}))
    if args.force_image_size is not None:
        size = args.force_image_size
        o.setdefault("vision_cfg", {})["image_size"] = size[0] if len(size) == 1 else list(size)
    if args.force_patch_dropout is not None:
        o.setdefault("vision_cfg", {})["patch_dropout"] = args.force_patch_dropout
    if args.force_context_length is not None:
        o.setdefault("text_cfg", {})["context_length"] = args.force_context_length
    if args.force_quick_gelu:
        o["quick_gelu"] = True
    return o or None


def compile_model(model, backend: str = "inductor") -> None:
    """--torchcompile: compile every residual block and each SPARO read-out in place (per-block
    compilation composes with FSDP2's per-block hooks and keeps the state-dict keys)."""
    for blk in fsdp.residual_blocks(model):
        blk.compile(backend=backend)
    for ro in getattr(model, "readouts", None) or ():
        ro.compile(backend=backend)


def backend_flags(device: torch.device) -> None:
    """As ``open_clip_train.main`` on CUDA: TF32 matmuls, cuDNN autotuning."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False


def check_precision(precision: str, device: torch.device) -> None:
    uses_bf16 = torch.bfloat16 in (fsdp.PRECISIONS[precision].param_dtype, fsdp.PRECISIONS[precision].autocast)
    if device.type == "cuda" and uses_bf16 and not torch.cuda.is_bf16_supported():
        raise Fatal(f"--precision {precision}: {torch.cuda.get_device_name(device)} does not support bf16; "
                    f"use --precision amp (fp16 autocast with a gradient scaler) or fp32")


class Trainer:
    def __init__(self, args):
        self.args = args
        self.info = self.device = None
        self.precision, self.prec = None, None
        self.name = self.run_dir = self.ckpt_dir = None
        self.created_run_dir = False
        self.started = False          # True once training began: from then on the run folder is kept
        self.metrics = None
        self.data: Optional[datasetup.DataPlan] = None
        self.nw = self.global_batch = self.steps_per_epoch = self.total_steps = 0
        self.model = self.tokenizer = self.pre_train = self.pre_val = None
        self.n_params = self.image_size = self.context_length = 0
        self.fwd_flops = 0.0
        self.optimizer = self.scheduler = self.loss_fn = self.scaler = None
        self.lr = 0.0
        self.vote_group = None
        self.ckpts: Optional[CheckpointManager] = None
        self.evaluator: Optional[Evaluator] = None
        self.progress: Optional[Progress] = None
        self.pos = Position()
        self.loader = None
        self._signalled = False
        self.signal_step: Optional[int] = None  # steps done when the preemption signal arrived (this rank)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        a = self.args
        self.info = info = D.init(a.device, a.dist_backend)
        self.device = info.device
        self.precision = a.precision or ("amp_bf16" if self.device.type == "cuda" else "fp32")
        self.prec = fsdp.PRECISIONS[self.precision]
        check_precision(self.precision, self.device)
        backend_flags(self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
        self.name = a.name or D.broadcast_object(f"{a.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.run_dir = os.path.join(a.logs, self.name)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        logger.setup(info.rank, a.debug, local_rank=info.local_rank if a.log_local else None)
        log.info(f"run {self.name}: {info.world_size} rank(s), {info.backend} on {self.device.type}, "
                 f"precision {self.precision}, model {a.model}")
        # everything that can fail at start-up happens before the run folder is created
        self.check_run_dir()
        try:
            logger.check_report_to(a.report_to)
        except logger.ReportError as e:
            raise Fatal(str(e)) from None
        check_imagenet(a.imagenet_val)
        self.data = datasetup.resolve(a, info)
        self.nw = max(1, a.workers)
        self.global_batch = a.batch_size * a.accum_freq * info.world_size
        self.steps_per_epoch = self.data.num_samples // self.global_batch
        if self.steps_per_epoch < 1:
            raise Fatal(f"{self.data.num_samples} samples per epoch is less than one global batch "
                        f"({self.global_batch})")
        self.total_steps = self.steps_per_epoch * a.epochs
        self.build_model()
        self.open_run_dir()
        self.install_preempt_handler()

    def check_run_dir(self) -> None:
        """Rank 0 decides (one view of the filesystem) whether this run may use its folder; all ranks stop alike."""
        why = None
        if self.info.is_main:
            why = rundir.logs_problem(self.args.logs) or rundir.refusal(self.run_dir, self.args.resume)
        why = D.broadcast_object(why)
        if why:
            raise Fatal(why)

    def build_model(self) -> None:
        from sparo_fast.clip import create_model

        a = self.args
        torch.manual_seed(a.seed)  # same initial weights on every rank (FSDP2 shards each rank's copy)
        try:
            model = create_model(a.model, fused=a.fused_sparo, precision="fp32", device=self.device,
                                 override=model_override(a), output_dict=True)
        except (KeyError, ValueError, RuntimeError, OSError) as e:
            raise Fatal(f"cannot build model {a.model!r}: {e}") from None
        if a.pretrained and a.pretrained.lower() != "none":
            try:
                path = pretrained.load_into(model, a.pretrained, a.cache_dir)
            except pretrained.PretrainedError as e:
                raise Fatal(str(e)) from None
            log.info(f"initial weights from {path}")
        self.transforms_and_tokenizer(model)
        self.n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        if a.max_params is not None and self.n_params > a.max_params:
            raise Fatal(f"model {a.model} has {self.n_params:,} parameters, above --max-params {a.max_params:,}")
        self.lock(model)
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.context_length = model.context_length
        self.fwd_flops = 0.0
        if F.peak_tflops(self.device, self.precision or a.precision or "fp32", a.peak_tflops):
            try:  # counting costs a forward pass; the figure is informative only
                self.fwd_flops = F.forward_flops_per_sample(model, self.image_size, self.context_length)
            except Exception as e:
                log.warning(f"could not count model FLOPs ({e!r}); no MFU figure")
        self.model = model

    def transforms_and_tokenizer(self, model) -> None:
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from sparo_fast.clip import get_tokenizer, tokenizer_for

        a = self.args
        pp = dict(model.visual.preprocess_cfg)
        for key, value in (("mean", a.image_mean), ("std", a.image_std)):
            if value is not None:
                pp[key] = tuple(value * 3 if len(value) == 1 else value)
        pp.update({k: v for k, v in (("interpolation", a.image_interpolation),
                                     ("resize_mode", a.image_resize_mode)) if v is not None})
        pp = PreprocessCfg(**pp)
        self.pre_train = image_transform_v2(pp, is_train=True, aug_cfg=a.aug_cfg or None)
        self.pre_val = image_transform_v2(pp, is_train=False)
        try:
            self.tokenizer = get_tokenizer(a.model if model_override(a) is None else model.config)
        except Exception:
            self.tokenizer = tokenizer_for(model)

    def lock(self, model) -> None:
        a = self.args
        if a.lock_image:
            model.lock_image_tower(unlocked_groups=a.lock_image_unlocked_groups,
                                   freeze_bn_stats=a.lock_image_freeze_bn_stats)
        if a.lock_text:
            # OpenCLIP supports only locked LayerNorms; the text read-out counts as the last group
            model.lock_text_tower(unlocked_layers=a.lock_text_unlocked_layers, freeze_layer_norm=True)
            if getattr(model, "text_sparo", None) is not None:
                model.text_sparo.requires_grad_(a.lock_text_unlocked_layers > 0)

    def open_run_dir(self) -> None:
        a, info = self.args, self.info
        self.created_run_dir = info.is_main and not os.path.exists(self.run_dir)
        why = None
        if info.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            rundir.claim(self.run_dir)
            with open(os.path.join(self.run_dir, "params.json"), "w") as f:
                json.dump(vars(a), f, indent=1, default=str)
            why = rundir.writable_problem(self.ckpt_dir, "checkpoint folder")
        why = D.broadcast_object(why)
        if why:
            raise Fatal(why)
        if info.is_main or (a.log_local and info.local_rank == 0):
            logger.add_file(os.path.join(self.run_dir, "out.log" if info.is_main else f"out-{info.rank}.log"))
        try:
            self.metrics = logger.MetricsWriter(self.run_dir, info.is_main, a.report_to, a)
        except logger.ReportError as e:
            raise Fatal(str(e)) from None
        self.ckpts = CheckpointManager(a, info, self.ckpt_dir, self.name)

    def install_preempt_handler(self) -> None:
        sig = self.args.preempt_signal
        if sig is not None:
            signal.signal(sig, self._on_signal)
        # a CPU group for the per-step "stop?" vote, so that NCCL runs do not sync the GPU for it
        self.vote_group = dist.new_group(backend="gloo") if self.info.backend == "nccl" else None

    def _on_signal(self, signum, frame) -> None:
        if not self._signalled:
            self.signal_step = self.pos.step
        self._signalled = True

    def shard(self) -> None:
        a, info = self.args, self.info
        fsdp.shard_model(self.model, self.device, info.world_size, self.precision, a.grad_checkpointing,
                         replicate=a.fsdp_replicate)
        if a.torchcompile:
            compile_model(self.model)
        from open_clip_train.params import get_default_params

        d = get_default_params(a.model)
        self.lr = a.lr if a.lr is not None else (self.data.default_lr or d["lr"])
        betas = (a.beta1 if a.beta1 is not None else d["beta1"], a.beta2 if a.beta2 is not None else d["beta2"])
        self.optimizer = optim.create_optimizer(self.model, self.lr, a.wd, betas, a.eps if a.eps is not None
                                                else d["eps"])
        if self.precision == "amp":  # FSDP2 takes the plain scaler (its unscale_ handles DTensor gradients)
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.loss_fn = make_loss(a.local_loss, a.gather_with_grad, info.rank, info.world_size)
        self.scheduler = optim.make_scheduler(a, self.optimizer, self.lr, self.steps_per_epoch, self.total_steps)
        kind = (f"SPARO read-outs, {'fused' if a.fused_sparo else 'reference'} backend"
                if getattr(self.model, "readouts", None) else "baseline CLIP (no SPARO read-out)")
        mesh = f", HSDP {a.fsdp_replicate} x {info.world_size // a.fsdp_replicate}" if a.fsdp_replicate > 1 else ""
        log.info(f"{a.model}: {kind}, {self.n_params:,} parameters; {self.data.num_samples:,} samples/epoch, "
                 f"global batch {self.global_batch} ({info.world_size} x {a.batch_size} x {a.accum_freq} accum), "
                 f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
                 f"{len(self.data.train_urls)} shards, lr {self.lr:g}{mesh}")

    # ------------------------------------------------------------------ resume, evaluation, checkpoints
    def resume(self) -> None:
        pos = self.ckpts.resume(self.model, self.optimizer, self.scaler, self.nw, self.steps_per_epoch)
        if pos is not None:
            self.pos = pos

    def evaluate(self, tag: str, val: bool = True, zeroshot: bool = True) -> Dict[str, float]:
        return self.evaluator.run(tag, self.pos.epoch, self.pos.step, self.prec.autocast, val, zeroshot)

    def checkpoint(self) -> str:
        return self.ckpts.save(self.model, self.optimizer, self.pos, self.nw)

    # ------------------------------------------------------------------ training
    def epoch_urls(self) -> List[str]:
        """--dataset-resampled: this epoch's shards drawn with replacement (weighted by source factors)."""
        urls = self.data.train_urls
        if not self.args.dataset_resampled:
            return urls
        rng = random.Random(f"resample-{self.args.seed}-{self.pos.epoch}")
        return rng.choices(urls, weights=self.data.weights, k=len(urls))

    def stop_vote(self) -> bool:
        """True on every rank when any rank received --preempt-signal (each rank finished its step)."""
        flag = torch.tensor([int(self._signalled)], dtype=torch.int32)
        if self.vote_group is None and self.device.type != "cpu":
            flag = flag.to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.vote_group)
        return bool(flag.item())

    def make_loader(self):
        a, p = self.args, self.pos
        if p.readers is None or p.step_in_epoch == 0:
            p.readers = Readers.fresh(self.nw)
        r = p.readers
        spec = data_mod.StreamSpec(
            urls=self.epoch_urls(), seed=a.seed, epoch=p.epoch, rank=self.info.rank,
            world_size=self.info.world_size, num_workers=a.workers, batch_size=a.batch_size,
            batches_per_rank=self.steps_per_epoch * a.accum_freq, start_batch=p.step_in_epoch * a.accum_freq,
            positions=list(r.positions), skipped=list(r.skipped), shuffle_buffer=a.shuffle_buffer,
            shard_errors=list(r.shard_errors), max_corrupt_fraction=a.max_corrupt_fraction)
        return iter(data_mod.train_loader(spec, self.pre_train, self.tokenizer,
                                          pin_memory=self.device.type == "cuda", timeout=a.data_timeout))

    def train_epoch(self) -> Optional[str]:
        """One epoch (or its remainder). Returns None at the epoch's end, else "max_steps" or "preempted"."""
        self.loader = self.make_loader()
        self.progress.window = Window()
        reason = None
        try:
            while self.pos.step_in_epoch < self.steps_per_epoch:
                reason = self.train_one_step()
                if reason:
                    break
        finally:
            self.loader = None
        return reason

    def next_batch(self):
        """The loader's next batch; a data failure (or no batch within --data-timeout) is one line."""
        try:
            return next(self.loader)
        except data_mod.DataError as e:
            raise Fatal(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            raise Fatal(f"no training batch for --data-timeout {self.args.data_timeout:g} s: the data stalled "
                        f"(unreadable or unreachable shards?)") from None

    def train_one_step(self) -> Optional[str]:
        a, p = self.args, self.pos
        t0 = time.time()
        micro = []
        for _ in range(a.accum_freq):
            images, texts, binfo = self.next_batch()
            p.readers.update(binfo.tolist())
            micro.append((images.to(self.device, non_blocking=True), texts.to(self.device, non_blocking=True)))
        self.progress.window.data_s += time.time() - t0
        lr = self.scheduler(p.step)
        loss, gnorm = train_step(self.model, micro, self.loss_fn, self.optimizer, a.grad_clip_norm,
                                 autocast=self.prec.autocast, scaler=self.scaler)
        p.step += 1
        p.step_in_epoch += 1
        self.progress.window.steps += 1
        last = p.step_in_epoch == self.steps_per_epoch
        reason = "max_steps" if a.max_steps is not None and p.step >= a.max_steps else None
        if a.preempt_signal is not None and self.stop_vote():
            reason = "preempted"
        if p.step % a.log_every_n_steps == 0 or last or reason or p.step == 1:
            self.progress.line(self.model, p.step, p.epoch, loss, gnorm, lr,
                               p.skipped_before + sum(p.readers.skipped),
                               p.shard_errors_before + sum(p.readers.shard_errors))
        if reason == "preempted" or (a.save_every_n_steps and p.step % a.save_every_n_steps == 0 and not last):
            self.checkpoint()
        return reason

    def end_epoch(self) -> Dict[str, float]:
        a, p = self.args, self.pos
        p.epoch += 1
        p.step_in_epoch = 0
        p.skipped_before += sum(p.readers.skipped)
        p.shard_errors_before += sum(p.readers.shard_errors)
        p.readers = Readers.fresh(self.nw)
        final = p.epoch == a.epochs
        scheduled = a.save_frequency and (p.epoch % a.save_frequency == 0 or final)
        res = self.evaluator.at_epoch_end(p.epoch, p.step, self.prec.autocast)  # OpenCLIP: evaluate, then save
        if a.save_most_recent or scheduled:
            self.checkpoint()
        if scheduled and not a.no_export:
            self.ckpts.save_epoch(self.model, self.optimizer, self.scaler, p)
        if a.save_most_recent and not a.no_export:
            self.ckpts.save_epoch(self.model, self.optimizer, self.scaler, p, "epoch_latest.pt")
        return res

    # ------------------------------------------------------------------ the run
    def start(self) -> None:
        a = self.args
        self.setup()
        self.shard()
        self.resume()
        self.evaluator = Evaluator(a, self.info, self.device, self.model, self.tokenizer, self.pre_val,
                                   self.data.val_urls, self.image_size, self.context_length, self.ckpt_dir,
                                   self.metrics)
        self.model.train()
        self.started = True
        peak = F.peak_tflops(self.device, self.precision, a.peak_tflops)
        step_flops = F.train_flops_per_step(self.fwd_flops, a.batch_size, a.accum_freq, self.global_batch,
                                            getattr(self.model, "embed_dim", 0) or 0, a.local_loss)
        plan = Plan(time.time(), self.pos.step, min(self.total_steps, a.max_steps or self.total_steps),
                    self.total_steps, self.global_batch, step_flops if self.fwd_flops else 0.0, peak)
        self.progress = Progress(self.device, self.info.world_size, self.metrics, plan)

    def run(self) -> int:
        a = self.args
        self.start()
        last_eval: Dict[str, float] = {}
        reason = "max_steps" if a.max_steps is not None and self.pos.step >= a.max_steps else None
        while self.pos.epoch < a.epochs and not reason:
            reason = self.train_epoch()
            if reason == "preempted":
                break
            if not reason or self.pos.step_in_epoch == self.steps_per_epoch:
                last_eval = self.end_epoch() or last_eval
        if reason == "preempted":
            log.warning(f"rank {self.info.rank}: preempt signal handled after step {self.signal_step}")
            log.warning(f"preempted: stopped at step {self.pos.step} after writing its checkpoint; continue with "
                        f"--resume latest (exit status {PREEMPTED})")
            self.metrics.close()
            return PREEMPTED
        return self.finish(reason is not None, last_eval)

    def counts(self):
        p = self.pos
        n = torch.tensor([p.skipped_before + sum(p.readers.skipped if p.readers else []),
                          p.shard_errors_before + sum(p.readers.shard_errors if p.readers else [])],
                         dtype=torch.long, device=self.device)
        dist.all_reduce(n)
        return int(n[0].item()), int(n[1].item())

    def finish(self, stopped: bool, last_eval: Dict[str, float]) -> int:
        a, p = self.args, self.pos
        n_skipped, n_shard_errors = self.counts()
        if stopped and not last_eval and (a.val_frequency or a.zeroshot_frequency):
            last_eval = self.evaluate("final", bool(a.val_frequency), bool(a.zeroshot_frequency))
        log.info(f"skipped {n_skipped} corrupt sample{'s' if n_skipped != 1 else ''}; {n_shard_errors} shard read "
                 f"error{'s' if n_shard_errors != 1 else ''} (each cut a shard short)")
        export_path = None
        if not a.no_export:
            name = f"step_{p.step}.pt" if stopped else f"epoch_{p.epoch}.pt"
            if stopped or not os.path.isfile(os.path.join(self.ckpt_dir, name)):
                self.ckpts.save_epoch(self.model, self.optimizer, self.scaler, p, name)
            export_path = os.path.join(self.ckpt_dir, name)
        summary = {"steps": p.step, "epoch": p.epoch, "skipped_samples": n_skipped, "shard_errors": n_shard_errors,
                   "wall_s": time.time() - self.progress.plan.t_start, "export": export_path, **last_eval}
        self.metrics.write("summary", p.step, summary)
        self.metrics.close()
        if self.info.is_main:
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        log.info(f"done: {p.step} steps in {summary['wall_s']:.1f}s; logs in {self.run_dir}")
        return 0


def discard_failed_start(trainer: "Trainer") -> None:
    """A run that failed before training began leaves no run folder behind (only one it created)."""
    if trainer.created_run_dir and not trainer.started and trainer.run_dir:
        shutil.rmtree(trainer.run_dir, ignore_errors=True)
