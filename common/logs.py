"""Logging set-up shared by the CLI and the tasks on the nodes."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("urllib3", "filelock", "matplotlib", "PIL", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Library chatter that says nothing about the run (sae-lens's hub hints, HF's progress noise).
    warnings.filterwarnings("ignore", module="sae_lens")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
