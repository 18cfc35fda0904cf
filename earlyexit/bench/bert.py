"""BERT fine-tuning throughput: the multi-exit BERT's encoder against Hugging Face ``BertModel``.

``benchmark_finetune`` times forward + backward + AdamW steps of both on the
same weights, head and batch (``benchmarks/bert_throughput.py`` prints it).
Needs ``transformers``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.bert import BertHead, bert, resolve_weights


def benchmark_finetune(weights: str | Path = "minilm-l6", *, batch_size: int = 32, seq_len: int = 64, steps: int = 3,
                       rounds: int = 3, warmup: int = 2, num_classes: int = 2) -> dict[str, float]:
    """Fine-tuning steps per second (forward + backward + AdamW) of ours vs ``transformers.BertModel``.

    Both encoders start from the same weights and carry the same final head
    (pooler, dropout, linear) on the same batch (with padding); ours runs with
    no ICs (``ic_after="none"``) so the work is identical. The two alternate in
    ``rounds`` timed rounds of ``steps`` steps, so a busy machine slows both
    alike; each model's median round counts. Needs ``transformers``.

    Args:
        weights: a checkpoint folder or alias.
        batch_size: rows of the random batch.
        seq_len: its sequence length.
        steps: steps per timed round.
        rounds: timed rounds per model.
        warmup: untimed steps per model first.
        num_classes: classifier width.
    Returns:
        ``{"ours_steps_per_s", "hf_steps_per_s", "ratio"}`` (ratio = ours / Hugging Face).
    """
    from transformers import BertModel  # optional dependency

    path = resolve_weights(weights)
    ours = bert(num_classes=num_classes, ic_after="none", weights=path).train()
    ref = BertModel.from_pretrained(str(path), attn_implementation="sdpa").train()
    ref_head = BertHead(ref.config.hidden_size, num_classes, dropout=ref.config.hidden_dropout_prob).train()
    ref_head.load_state_dict(ours.heads[-1].state_dict())
    x = ours.example_input(batch_size, seq_len=seq_len)
    y = torch.randint(0, num_classes, (batch_size,), generator=torch.Generator().manual_seed(1))
    runs = {
        "ours": (lambda: ours(x)[-1], torch.optim.AdamW(ours.parameters(), lr=1e-5)),
        "hf": (lambda: ref_head({"hidden": ref(**x).last_hidden_state}),
               torch.optim.AdamW([*ref.parameters(), *ref_head.parameters()], lr=1e-5)),
    }

    def step(name: str) -> None:
        logits, opt = runs[name][0](), runs[name][1]
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for name in runs:
        for _ in range(warmup):
            step(name)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name in runs:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(name)
            rates[name].append(steps / (time.perf_counter() - t0))
    o, h = statistics.median(rates["ours"]), statistics.median(rates["hf"])
    return {"ours_steps_per_s": o, "hf_steps_per_s": h, "ratio": o / h}


__all__ = ["benchmark_finetune"]
