"""Fine-tuning throughput of the multi-exit BERT's encoder against Hugging Face ``BertModel``.

Part of the ``earlyexit`` reference implementation of "Joint or Disjoint:
Mixing Training Regimes for Early-Exit Models". One run times both models
(forward + backward + AdamW step, same weights, same head, same batch) and
prints steps per second and their ratio.

    python benchmarks/bert_throughput.py --threads 1 --batch-size 32 --seq-len 64
"""

from __future__ import annotations

import argparse

import torch

from earlyexit.bench.bert import benchmark_finetune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="minilm-l6", help="checkpoint folder or alias")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    r = benchmark_finetune(a.weights, batch_size=a.batch_size, seq_len=a.seq_len, steps=a.steps, rounds=a.rounds)
    print(f"CPU, {torch.get_num_threads()} thread(s), batch {a.batch_size} x {a.seq_len} tokens, {a.weights}")
    print(f"ours         {r['ours_steps_per_s']:.3f} steps/s")
    print(f"transformers {r['hf_steps_per_s']:.3f} steps/s")
    print(f"ratio (ours / transformers) {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
