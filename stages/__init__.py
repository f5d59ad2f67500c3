"""molt: post-training of language models as a DAG of cached, content-addressed stages."""

import os

__version__ = "0.1.0"

# DeepSpeed (a test extra) prints a warning on every import that guesses the accelerator; on a
# machine without an NVIDIA driver the guess is the CPU, so say it and keep molt's output clean
if not os.path.exists("/proc/driver/nvidia/version"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
