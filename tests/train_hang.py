"""Helper run under ``torchrun`` by tests/test_train_run.py (not a test module itself): the trainer,
parked right after writing the checkpoint of step ``$HANG_AT_STEP``, so that the test can SIGKILL it
there. It publishes the pids of the rank and of its loader workers in ``<run>/hang_pids_rank<R>.txt``."""
import os
import sys
import time

from sparo_fast_training.main import main
from sparo_fast_training.trainer import Trainer


class HangAfterSave(Trainer):
    def checkpoint(self):
        path = super().checkpoint()
        if self.pos.step == int(os.environ["HANG_AT_STEP"]):
            pids = [os.getpid()] + [w.pid for w in getattr(self.loader, "_workers", [])]
            with open(os.path.join(self.run_dir, f"hang_pids_rank{self.info.rank}.txt"), "w") as f:
                f.write(" ".join(map(str, pids)))
            while True:
                time.sleep(60)
        return path


if __name__ == "__main__":
    sys.exit(main(trainer_cls=HangAfterSave))
