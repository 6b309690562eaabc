"""The trainer: phases (set-up, resume, epoch, evaluation, checkpoint, finish) as methods of ``Trainer``.

Tests subclass it to hook a phase (tests/train_hang.py); nothing test-only lives here.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import resource
import shutil
import signal
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import data as data_mod
from . import distributed as D
from . import evaluate as ev
from . import flops as F
from . import fsdp, logger, optim, synthetic
from .loop import make_loss, train_step

log = logging.getLogger(logger.NAME)

PREEMPTED = 3  # exit status of a run stopped by --preempt-signal after writing its checkpoint


class Fatal(Exception):
    """Stops the run with one clear line (exit status 2)."""


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)


def _hms(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


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


class Trainer:
    def __init__(self, args):
        self.args = args
        self.step = self.epoch = self.step_in_epoch = 0
        self.positions: Optional[List[int]] = None
        self.skipped_ep: Optional[List[int]] = None
        self.skipped_before = 0
        self.loader = None
        self._signalled = False
        self.metrics = None
        self.run_dir = None
        self.created_run_dir = False
        self.started = False  # True once training began: from then on the run folder is kept

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        a = self.args
        self.info = info = D.init(a.device, a.dist_backend)
        self.device = info.device
        self.precision = a.precision or ("amp_bf16" if self.device.type == "cuda" else "fp32")
        self.prec = fsdp.PRECISIONS[self.precision]
        if self.device.type == "cpu":
            torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
        self.name = a.name or D.broadcast_object(f"{a.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.run_dir = os.path.join(a.logs, self.name)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        logger.setup(info.rank, a.debug, local_rank=info.local_rank if a.log_local else None)
        log.info(f"run {self.name}: {info.world_size} rank(s), {info.backend} on {self.device.type}, "
                 f"precision {self.precision}, model {a.model}")
        # everything that can fail at start-up happens before the run folder is created
        try:
            logger.check_report_to(a.report_to)
        except logger.ReportError as e:
            raise Fatal(str(e)) from None
        self.data = self.resolve_data()
        self.nw = max(1, a.workers)
        self.global_batch = a.batch_size * a.accum_freq * info.world_size
        self.steps_per_epoch = self.data["num_samples"] // self.global_batch
        if self.steps_per_epoch < 1:
            raise Fatal(f"{self.data['num_samples']} samples per epoch is less than one global batch "
                        f"({self.global_batch})")
        self.total_steps = self.steps_per_epoch * a.epochs
        self.build_model()
        self.open_run_dir()
        self.install_preempt_handler()

    def resolve_data(self) -> Dict[str, Any]:
        a, info = self.args, self.info
        out: Dict[str, Any] = {"val_urls": None}
        if a.train_data is None:
            # one generator per node (the cache is node-local); the others wait, then find it complete
            def make():
                return synthetic.ensure_synthetic(a.data_cache_dir, a.synthetic_train_samples,
                                                  a.synthetic_val_samples, seed=0, log=log.info,
                                                  shard_size=a.synthetic_shard_size)
            d = make() if info.local_rank == 0 else None
            dist.barrier()
            d = d or make()
            out["sources"] = [data_mod.expand_urls(d["train"])]
            out["num_samples"] = a.train_num_samples or d["train_num_samples"]
            out["val_urls"] = data_mod.expand_urls(a.val_data or d["val"])
            self.default_lr = 1e-3
        else:
            out["sources"] = [data_mod.expand_urls(s) for s in a.train_data.split("::")]
            if a.val_data:
                out["val_urls"] = data_mod.expand_urls(a.val_data)
            self.default_lr = None
        out["train_urls"] = [u for s in out["sources"] for u in s]
        try:
            data_mod.check_shards(out["train_urls"], "--train-data")
            if out["val_urls"] is not None:
                data_mod.check_shards(out["val_urls"], "--val-data")
        except data_mod.DataError as e:
            raise Fatal(str(e)) from None
        if "num_samples" not in out:
            n = a.train_num_samples or data_mod.count_samples(out["train_urls"])
            if not n:
                raise Fatal("--train-data: give --train-num-samples (no sizes.json beside the shards)")
            out["num_samples"] = n
        if a.train_data_upsampling_factors:
            f = [float(x) for x in a.train_data_upsampling_factors.split("::")]
            if len(f) != len(out["sources"]):
                raise Fatal(f"--train-data-upsampling-factors: {len(f)} factors for {len(out['sources'])} sources")
            out["weights"] = [w for w, s in zip(f, out["sources"]) for _ in s]
        return out

    def build_model(self) -> None:
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from sparo_fast.clip import create_model, get_tokenizer, tokenizer_for

        a = self.args
        torch.manual_seed(a.seed)  # same initial weights on every rank (FSDP2 shards each rank's copy)
        try:
            model = create_model(a.model, fused=a.fused_sparo, precision="fp32", device=self.device,
                                 override=model_override(a), output_dict=True,
                                 pretrained=a.pretrained if a.pretrained and a.pretrained != "none" else None)
        except (KeyError, ValueError, RuntimeError, OSError) as e:
            raise Fatal(f"cannot build model {a.model!r}: {e}") from None
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
        self.n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        if a.max_params is not None and self.n_params > a.max_params:
            raise Fatal(f"model {a.model} has {self.n_params:,} parameters, above --max-params {a.max_params:,}")
        self.lock(model)
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.context_length = model.context_length
        self.fwd_flops = 0.0
        precision = getattr(self, "precision", a.precision or "fp32")  # unset when built without setup()
        if F.peak_tflops(self.device, precision, a.peak_tflops):  # counting costs a forward pass
            try:
                self.fwd_flops = F.forward_flops_per_sample(model, self.image_size, self.context_length)
            except Exception as e:  # the FLOP figure is informative only
                log.warning(f"could not count model FLOPs ({e!r}); no MFU figure")
        self.model = model

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
        if info.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "params.json"), "w") as f:
                json.dump(vars(a), f, indent=1, default=str)
        if info.is_main or (a.log_local and info.local_rank == 0):
            logger.add_file(os.path.join(self.run_dir, "out.log" if info.is_main else f"out-{info.rank}.log"))
        try:
            self.metrics = logger.MetricsWriter(self.run_dir, info.is_main, a.report_to, a)
        except logger.ReportError as e:
            raise Fatal(str(e)) from None

    def install_preempt_handler(self) -> None:
        sig = self.args.preempt_signal
        if sig is not None:
            signal.signal(sig, self._on_signal)
        # a CPU group for the per-step "stop?" vote, so that NCCL runs do not sync the GPU for it
        self.vote_group = dist.new_group(backend="gloo") if self.info.backend == "nccl" else None

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def shard(self) -> None:
        a, info = self.args, self.info
        fsdp.shard_model(self.model, self.device, info.world_size, self.precision, a.grad_checkpointing)
        if a.torchcompile:
            compile_model(self.model)
        from open_clip_train.params import get_default_params

        d = get_default_params(a.model)
        self.lr = a.lr if a.lr is not None else (self.default_lr or d["lr"])
        betas = (a.beta1 if a.beta1 is not None else d["beta1"], a.beta2 if a.beta2 is not None else d["beta2"])
        self.optimizer = optim.create_optimizer(self.model, self.lr, a.wd, betas, a.eps if a.eps is not None
                                                else d["eps"])
        self.loss_fn = make_loss(a.local_loss, a.gather_with_grad, info.rank, info.world_size)
        self.scheduler = optim.make_scheduler(a, self.optimizer, self.lr, self.steps_per_epoch, self.total_steps)
        peak = F.peak_tflops(self.device, self.precision, a.peak_tflops)
        self.peak = peak
        self.step_flops = F.train_flops_per_step(self.fwd_flops, a.batch_size, a.accum_freq, self.global_batch,
                                                 getattr(self.model, "embed_dim", 0) or 0, a.local_loss)
        kind = (f"SPARO read-outs, {'fused' if a.fused_sparo else 'reference'} backend"
                if getattr(self.model, "readouts", None) else "baseline CLIP (no SPARO read-out)")
        log.info(f"{a.model}: {kind}, {self.n_params:,} parameters; {self.data['num_samples']:,} samples/epoch, "
                 f"global batch {self.global_batch} ({info.world_size} x {a.batch_size} x {a.accum_freq} accum), "
                 f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
                 f"{len(self.data['train_urls'])} shards, lr {self.lr:g}")

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        a, info = self.args, self.info
        path = None
        if a.resume == "latest":
            path = ckpt.latest(self.ckpt_dir)
            if path is None:
                log.info(f"--resume latest: no complete checkpoint in {self.ckpt_dir}; starting from scratch")
        elif a.resume:
            path = a.resume
            if not os.path.isfile(os.path.join(path, "train_state.pt")):
                raise Fatal(f"--resume {path}: not a complete checkpoint folder (no train_state.pt)")
        if path is None:
            return
        blob = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
        r0 = blob["ranks"][0]
        same_layout = (blob["world_size"] == info.world_size and r0["workers"] == self.nw
                       and r0["batch_size"] == a.batch_size and r0["accum_freq"] == a.accum_freq)
        if r0["step_in_epoch"] != 0 and not same_layout:
            raise Fatal(f"cannot resume {path} mid-epoch with a different layout: it was written by "
                        f"{blob['world_size']} rank(s) x {r0['workers']} worker(s), batch {r0['batch_size']} x "
                        f"{r0['accum_freq']} accum; now {info.world_size} x {self.nw}, batch {a.batch_size} x "
                        f"{a.accum_freq} (resume at an epoch boundary, or with the same layout)")
        if r0["step_in_epoch"] != 0 and r0.get("seed", a.seed) != a.seed:
            raise Fatal(f"cannot resume {path} mid-epoch with --seed {a.seed}: it was written with "
                        f"--seed {r0['seed']} (the data order depends on it)")
        ckpt.load(path, self.model, self.optimizer)
        self.step, self.epoch, self.step_in_epoch = r0["step"], r0["epoch"], r0["step_in_epoch"]
        if same_layout:
            mine = blob["ranks"][info.rank]
            self.positions, self.skipped_ep = mine["positions"], mine["skipped"]
            self.skipped_before = mine["skipped_before"]
            ckpt.set_rng_state(mine["rng"])
        log.info(f"resumed from {path}: step {self.step}, epoch {self.epoch}, step {self.step_in_epoch} of the epoch")

    # ------------------------------------------------------------------ evaluation
    def load_eval(self) -> None:
        a = self.args
        self.val_samples = None
        if not a.no_eval and self.data["val_urls"] is not None:
            self.val_samples = data_mod.load_eval_samples(self.data["val_urls"], self.pre_val, self.tokenizer,
                                                          self.info.rank, self.info.world_size,
                                                          limit=a.val_num_samples)

    def autocast(self):
        if self.prec.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.prec.autocast)

    def evaluate(self, tag: str, val: bool = True, zeroshot: bool = True) -> Dict[str, float]:
        a = self.args
        if a.no_eval:
            return {}
        self.model.eval()
        res: Dict[str, float] = {}
        t0 = time.time()
        dummy = torch.zeros(3, self.image_size, self.image_size)
        with self.autocast():
            if val and self.val_samples is not None:
                res.update(ev.evaluate_pairs(self.model, self.val_samples, self.tokenizer, a.batch_size * 2,
                                             self.device, dummy, self.context_length))
            if zeroshot and a.imagenet_val:
                res.update(ev.imagenet_zero_shot(self.model, self.tokenizer, a.imagenet_val, self.pre_val,
                                                 a.batch_size * 2, a.workers, self.device, self.info.rank,
                                                 self.info.world_size))
        self.model.train()
        if res:
            log.info(f"eval ({tag}, step {self.step}, {time.time() - t0:.1f}s): "
                     + "  ".join(f"{k} {v:.4f}" if abs(v) < 10 else f"{k} {v:.0f}" for k, v in res.items()))
            self.metrics.write("eval", self.step, {"epoch": self.epoch, **res})
        return res

    # ------------------------------------------------------------------ checkpoint
    def train_state(self) -> Dict[str, Any]:
        a = self.args
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "positions": list(self.positions), "skipped": list(self.skipped_ep),
                "skipped_before": self.skipped_before, "rng": ckpt.rng_state(), "workers": self.nw,
                "batch_size": a.batch_size, "accum_freq": a.accum_freq, "seed": a.seed}

    def checkpoint(self) -> str:
        keep = 1 if self.args.delete_previous_checkpoint else self.args.keep_checkpoints
        path = ckpt.save(self.ckpt_dir, self.step, self.model, self.optimizer, self.train_state(), keep=keep)
        self.last_saved = self.step
        log.info(f"saved checkpoint {path}")
        return path

    def export(self, filename: str) -> str:
        path = os.path.join(self.ckpt_dir, filename)
        ckpt.export(path, self.model, {"epoch": self.epoch, "step": self.step, "name": self.args.model,
                                       "model_config": getattr(self.model, "config", None)})
        log.info(f"exported {path}")
        return path

    # ------------------------------------------------------------------ training
    def epoch_urls(self) -> List[str]:
        """--dataset-resampled: this epoch's shards drawn with replacement (weighted by source factors)."""
        urls = self.data["train_urls"]
        if not self.args.dataset_resampled:
            return urls
        rng = random.Random(f"resample-{self.args.seed}-{self.epoch}")
        return rng.choices(urls, weights=self.data.get("weights"), k=len(urls))

    def stop_vote(self) -> bool:
        """True on every rank when any rank received --preempt-signal (each rank finished its step)."""
        flag = torch.tensor([int(self._signalled)], dtype=torch.int32)
        if self.vote_group is None and self.device.type != "cpu":
            flag = flag.to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.vote_group)
        return bool(flag.item())

    def train_epoch(self) -> Optional[str]:
        """One epoch (or its remainder). Returns None at the epoch's end, else "max_steps" or "preempted"."""
        a = self.args
        if self.positions is None or self.step_in_epoch == 0:
            self.positions, self.skipped_ep = [0] * self.nw, [0] * self.nw
        spec = data_mod.StreamSpec(
            urls=self.epoch_urls(), seed=a.seed, epoch=self.epoch, rank=self.info.rank,
            world_size=self.info.world_size, num_workers=a.workers, batch_size=a.batch_size,
            batches_per_rank=self.steps_per_epoch * a.accum_freq, start_batch=self.step_in_epoch * a.accum_freq,
            positions=list(self.positions), skipped=list(self.skipped_ep), shuffle_buffer=a.shuffle_buffer)
        self.loader = iter(data_mod.train_loader(spec, self.pre_train, self.tokenizer,
                                                 pin_memory=self.device.type == "cuda"))
        self.window = [time.time(), 0.0, 0]  # start, data seconds, steps
        reason = None
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                reason = self.train_one_step()
                if reason:
                    break
        finally:
            self.loader = None
        return reason

    def train_one_step(self) -> Optional[str]:
        a = self.args
        t0 = time.time()
        micro = []
        for _ in range(a.accum_freq):
            images, texts, binfo = next(self.loader)
            w, pos, sk = binfo.tolist()
            self.positions[w], self.skipped_ep[w] = pos, sk
            micro.append((images.to(self.device, non_blocking=True), texts.to(self.device, non_blocking=True)))
        self.window[1] += time.time() - t0
        lr = self.scheduler(self.step)
        loss, gnorm = train_step(self.model, micro, self.loss_fn, self.optimizer, a.grad_clip_norm,
                                 autocast=self.prec.autocast)
        self.step += 1
        self.step_in_epoch += 1
        self.window[2] += 1
        last = self.step_in_epoch == self.steps_per_epoch
        reason = "max_steps" if a.max_steps is not None and self.step >= a.max_steps else None
        if a.preempt_signal is not None and self.stop_vote():
            reason = "preempted"
        if self.step % a.log_every_n_steps == 0 or last or reason or self.step == 1:
            self.log_progress(loss, gnorm, lr)
        if reason == "preempted" or (a.save_every_n_steps and self.step % a.save_every_n_steps == 0 and not last):
            self.checkpoint()
        return reason

    def log_progress(self, loss: torch.Tensor, gnorm: torch.Tensor, lr: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ws = self.info.world_size
        now = time.time()
        dt = now - self.window[0]
        loss = loss.reshape(1).float().clone()
        dist.all_reduce(loss)  # mean over ranks (with --local-loss each holds its rows' loss)
        loss /= ws
        steps = self.window[2]
        sps = steps * self.global_batch / dt
        achieved = steps * self.step_flops / dt / 1e12 if self.fwd_flops else None  # per rank
        elapsed = now - self.t_start
        done = self.step - self.first_step
        eta = elapsed / done * (self.planned_steps - self.step) if done else 0.0
        rec = {"epoch": self.epoch, "loss": loss.item(), "lr": lr, "samples_per_s": sps,
               "data_time_pct": 100.0 * self.window[1] / dt, "grad_norm": gnorm.item(),
               "peak_mem_gb": _peak_memory_gb(self.device), "tflops_per_rank": achieved,
               "mfu": achieved / self.peak if self.peak and self.fwd_flops else None,
               "logit_scale": float(ev.logit_scale_value(self.model)),
               "elapsed_s": elapsed, "eta_s": eta}
        log.info(f"epoch {self.epoch} step {self.step}/{self.total_steps} "
                 f"({100.0 * self.step / self.total_steps:.0f}%) elapsed {_hms(elapsed)} eta {_hms(eta)} | "
                 f"loss {rec['loss']:.4f} lr {lr:.3g} | {sps:.1f} samples/s | data {rec['data_time_pct']:.0f}% "
                 f"| grad-norm {rec['grad_norm']:.3f} | peak mem {rec['peak_mem_gb']:.2f} GB | "
                 + (f"MFU {100 * rec['mfu']:.1f}% ({achieved:.3f} TFLOP/s/rank) | " if rec["mfu"] is not None else "")
                 + f"scale {rec['logit_scale']:.1f}")
        self.metrics.write("train", self.step, rec)
        self.window = [time.time(), 0.0, 0]

    def end_epoch(self) -> Dict[str, float]:
        a = self.args
        self.epoch += 1
        self.step_in_epoch = 0
        self.skipped_before += sum(self.skipped_ep)
        self.positions, self.skipped_ep = [0] * self.nw, [0] * self.nw
        final = self.epoch == a.epochs
        if a.save_most_recent or (a.save_frequency and (self.epoch % a.save_frequency == 0 or final)):
            self.checkpoint()
        if a.save_most_recent and not a.no_export:
            self.export("epoch_latest.pt")
        val = final or (a.val_frequency and self.epoch % a.val_frequency == 0)
        zs = final or (a.zeroshot_frequency and self.epoch % a.zeroshot_frequency == 0)
        return self.evaluate(f"epoch {self.epoch}", bool(val), bool(zs)) if (val or zs) else {}

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        a = self.args
        self.setup()
        self.shard()
        self.resume()
        self.load_eval()
        self.model.train()
        self.started = True
        self.t_start, self.first_step = time.time(), self.step
        self.planned_steps = min(self.total_steps, a.max_steps or self.total_steps)
        self.last_saved = -1
        last_eval: Dict[str, float] = {}
        reason = "max_steps" if a.max_steps is not None and self.step >= a.max_steps else None
        while self.epoch < a.epochs and not reason:
            reason = self.train_epoch()
            if reason == "preempted":
                break
            if not reason or self.step_in_epoch == self.steps_per_epoch:
                last_eval = self.end_epoch() or last_eval
        if reason == "preempted":
            log.warning(f"preempted: stopped at step {self.step} after writing its checkpoint; continue with "
                        f"--resume latest (exit status {PREEMPTED})")
            self.metrics.close()
            return PREEMPTED
        return self.finish(reason is not None, last_eval)

    def finish(self, stopped: bool, last_eval: Dict[str, float]) -> int:
        a = self.args
        n = torch.tensor([self.skipped_before + sum(self.skipped_ep or [])], dtype=torch.long, device=self.device)
        dist.all_reduce(n)
        n_skipped = int(n.item())
        if stopped and not last_eval:
            last_eval = self.evaluate("final")
        log.info(f"skipped {n_skipped} corrupt sample{'s' if n_skipped != 1 else ''}")
        export_path = None
        if not a.no_export:
            name = f"step_{self.step}.pt" if stopped else f"epoch_{self.epoch}.pt"
            if a.delete_previous_checkpoint and self.info.is_main and os.path.isdir(self.ckpt_dir):
                for f in os.listdir(self.ckpt_dir):
                    if f.endswith(".pt") and f != "epoch_latest.pt" and f != name:
                        os.remove(os.path.join(self.ckpt_dir, f))
            export_path = self.export(name)
        summary = {"steps": self.step, "epoch": self.epoch, "skipped_samples": n_skipped,
                   "wall_s": time.time() - self.t_start, "export": export_path, **last_eval}
        self.metrics.write("summary", self.step, summary)
        self.metrics.close()
        if self.info.is_main:
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        log.info(f"done: {self.step} steps in {summary['wall_s']:.1f}s; logs in {self.run_dir}")
        return 0


def discard_failed_start(trainer: "Trainer") -> None:
    """A run that failed before training began leaves no run folder behind (only one it created)."""
    if trainer.created_run_dir and not trainer.started and trainer.run_dir:
        shutil.rmtree(trainer.run_dir, ignore_errors=True)
