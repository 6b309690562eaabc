"""How this trainer's command line relates to OpenCLIP's (``open_clip_train.params``).

Every flag of ``open_clip_train.params`` is either accepted with OpenCLIP's meaning or listed in
``REFUSED`` with the one-line reason printed when it is given. ``DEFAULTS`` lists the accepted flags
whose default differs from OpenCLIP's (chosen for the built-in data set and CPUs), ``PROJECT_FLAGS``
the flags OpenCLIP does not have. tests/test_train_cli.py checks these tables against the installed
``open_clip_train`` exactly, so a new OpenCLIP flag shows up as a failing test, not a silent gap.
"""
from __future__ import annotations

_FP16 = ("fp16 weights train without a gradient scaler in OpenCLIP; this trainer runs fp16 only as --precision amp "
         "(fp16 autocast over fp32 weights with a gradient scaler) or use amp_bf16")

# OpenCLIP flag -> why it is refused here (one line)
REFUSED = {
    "--csv-separator": "csv data sets are not supported; give webdataset shards (--dataset-type webdataset)",
    "--csv-img-key": "csv data sets are not supported; give webdataset shards (--dataset-type webdataset)",
    "--csv-caption-key": "csv data sets are not supported; give webdataset shards (--dataset-type webdataset)",
    "--imagenet-v2": "ImageNetV2 evaluation is not implemented; --imagenet-val gives ImageNet zero-shot",
    "--momentum": "only AdamW is supported (--opt adamw); momentum is for timm optimizers",
    "--use-bn-sync": "SyncBatchNorm conversion is not done under FSDP2 here: BatchNorm statistics of an RN tower "
                     "would stay per rank (the SPARO and ViT towers have no BatchNorm)",
    "--pretrained-image": "timm image towers are not supported; SPARO towers are OpenCLIP ViTs",
    "--force-custom-text": "the text tower keeps CLIP's layout (SPARO reads it out); CustomTextCLIP is not supported",
    "--torchscript": "FSDP2 modules cannot be scripted; use --torchcompile",
    "--trace": "torch.jit.trace is for inference export, not training; use --torchcompile",
    "--dist-url": "the process group comes from torchrun's environment (use torchrun --rdzv-endpoint)",
    "--copy-codebase": "not supported: install the package at a fixed commit (the run's params.json records the flags)",
    "--horovod": "Horovod is not supported: launch with torchrun (FSDP2)",
    "--ddp-static-graph": "a DDP option; this trainer shards with FSDP2",
    "--no-set-device-rank": "each rank always uses the device of its local rank",
    "--coca-caption-loss-weight": "CoCa models are not supported",
    "--coca-contrastive-loss-weight": "CoCa models are not supported",
    "--remote-sync": "remote checkpoint sync is not supported; write --logs to a shared filesystem",
    "--remote-sync-frequency": "remote checkpoint sync is not supported; write --logs to a shared filesystem",
    "--remote-sync-protocol": "remote checkpoint sync is not supported; write --logs to a shared filesystem",
    "--distill-model": "distillation is not supported",
    "--distill-pretrained": "distillation is not supported",
    "--use-bnb-linear": "bitsandbytes linear layers are not supported (FSDP2 shards plain parameters)",
    "--siglip": "the SigLIP loss is not supported (the SPARO recipes use the CLIP loss)",
    "--loss-dist-impl": "a SigLIP option; the SigLIP loss is not supported",
}

# values of accepted flags that are refused, with the reason
REFUSED_VALUES = {
    ("--precision", "fp16"): _FP16,
    ("--precision", "pure_fp16"): _FP16,
    ("--dataset-type", "csv"): REFUSED["--csv-separator"],
    ("--dataset-type", "synthetic"): "OpenCLIP's random-tensor set; without --train-data the built-in "
                                      "synthetic compositional set is used",
}

# accepted OpenCLIP flags whose default differs here: flag -> (this trainer's default, why)
DEFAULTS = {
    "--model": ("ViT-Tiny-SPARO", "the tiny SPARO model trains on a CPU in minutes"),
    "--workers": (1, "CPU-friendly; the published recipe gives --workers 4"),
    "--epochs": (3, "enough for the built-in set"),
    "--warmup": (50, "sized for the built-in set; the published recipe gives --warmup 3600"),
    "--wd": (0.1, "sized for the built-in set; the published recipe gives --wd 0.5"),
    "--zeroshot-frequency": (1, "evaluate every epoch (the published recipe gives 1)"),
    "--log-every-n-steps": (20, "short runs on the built-in set"),
    "--precision": (None, "None: amp_bf16 on CUDA (the published recipes' setting), fp32 on CPU; OpenCLIP's "
                          "default 'amp' (fp16 autocast with a gradient scaler) is accepted"),
    "--device": ("auto", "auto: CUDA when available, else CPU"),
    "--logs": ("logs", "same folder as OpenCLIP's ./logs/"),
}

# accepted OpenCLIP flags whose default (None in both parsers) is resolved differently at run time
RUNTIME_DEFAULTS = {
    "--lr": "1e-3 on the built-in set; with --train-data OpenCLIP's default for the model (5e-4)",
}

# flags this trainer has and OpenCLIP's trainer does not (--logs-dir is an alias of --logs)
PROJECT_FLAGS = {
    "--override-model-config", "--fused-sparo", "--max-params", "--logs-dir", "--data-cache-dir",
    "--synthetic-train-samples", "--synthetic-val-samples", "--synthetic-shard-size", "--shuffle-buffer",
    "--save-every-n-steps", "--keep-checkpoints", "--no-export", "--no-eval", "--peak-tflops", "--max-steps",
    "--threads", "--preempt-signal", "--max-corrupt-fraction", "--data-timeout", "--fsdp-replicate",
}
