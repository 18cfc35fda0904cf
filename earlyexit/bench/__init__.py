"""Every benchmark of the package, one kind per module.

- ``machine``: ``run_bench`` (the ``bench`` command): the ratios behind the regimes and their table;
- ``training``: training-step times of phases 1-3 (the loop's own ``train_step``) and batch drawing;
- ``sweep``: one forward pass against the threshold sweep over its stored logits;
- ``inference``: early-exit ``predict`` against the plain backbone;
- ``bert``: BERT fine-tuning throughput against Hugging Face ``transformers`` (``benchmarks/bert_throughput.py``).
"""

from .bert import benchmark_finetune
from .inference import inference_bench
from .machine import TARGETS, run_bench
from .sweep import time_sweep
from .training import time_phases

__all__ = ["run_bench", "TARGETS", "time_phases", "time_sweep", "inference_bench", "benchmark_finetune"]
