"""sparo-fast trainer: ``torchrun --nproc_per_node N training/main.py --fused-sparo [flags]``.

OpenCLIP's command line (training/configs.py lists what differs), FSDP2, webdataset input, exactly
resumable sharded checkpoints, preemption-safe, evaluation with every rank taking part. With no
``--train-data`` a synthetic compositional set is generated once and used (see ``--help``).
The phases live in training/trainer.py.
"""
from __future__ import annotations

import os
import sys
import warnings

from sparo_fast_training import distributed as D
from sparo_fast_training.params import parse_args
from sparo_fast_training.trainer import Fatal, Trainer, discard_failed_start

# FSDP2 warns that the root returns views (the features); nothing here modifies them in place
warnings.filterwarnings("ignore", message=".*returned a view tensor.*")


def main(argv=None, trainer_cls=Trainer) -> int:
    """Exit status: 0 done, 2 a one-line error (printed last, by rank 0), 3 preempted after a checkpoint."""
    args = parse_args(argv)
    trainer = trainer_cls(args)
    error = None
    try:
        return trainer.run()
    except Fatal as e:
        error = str(e)
        if trainer.metrics is not None:
            trainer.metrics.close()
        discard_failed_start(trainer)
        return 2
    finally:
        D.cleanup(synchronize=error is None)
        if error is not None and int(os.environ.get("RANK", "0")) == 0:
            sys.stdout.flush()
            print(f"error: {error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
