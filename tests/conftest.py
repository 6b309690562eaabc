import os

import torch

# Kernel tests run the real Triton kernels through the interpreter when there is no GPU. Triton
# reads this when a kernel is defined, so it must be set before the kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
