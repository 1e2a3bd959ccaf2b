"""Short embedding distillation: a pruned encoder learns to reproduce the full encoder's vectors.

Loss per batch is MSE between the unit vectors plus (1 - cosine); the teacher's vectors are
computed once. Minutes on 2 CPU cores for MiniLM on the shipped corpus."""

from __future__ import annotations

import random

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.nn import functional as F

from ecomserve.export.pooled_encoder import PooledEncoder
from ecomserve.spec import DistillSpec
from ecomserve.tokenization import TextTokenizer


def distill(
    student: PooledEncoder,
    teacher: PooledEncoder,
    tokenizer: TextTokenizer,
    texts: list[str],
    spec: DistillSpec,
    progress: Progress | None = None,
) -> list[float]:
    """Train `student` in place; returns the mean loss of each epoch."""
    torch.manual_seed(spec.seed)
    batches = [texts[i : i + spec.batch_size] for i in range(0, len(texts), spec.batch_size)]
    order = list(range(len(batches)))
    with torch.no_grad():  # not inference_mode: the targets enter the autograd graph of the loss
        targets = [teacher(*_tensors(tokenizer, batch)) for batch in batches]
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec.learning_rate)
    progress = progress or Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn()
    )
    task = progress.add_task("distil", total=spec.epochs * len(batches))
    losses = []
    student.train()
    try:
        for epoch in range(spec.epochs):
            random.Random(spec.seed + epoch).shuffle(order)
            total = 0.0
            for index in order:
                vectors = student(*_tensors(tokenizer, batches[index]))
                target = targets[index]
                loss = F.mse_loss(vectors, target) * vectors.shape[1] + (1 - (vectors * target).sum(dim=1)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
                progress.update(task, advance=1, description=f"distil epoch {epoch + 1}/{spec.epochs} loss {loss:.4f}")
            losses.append(total / len(batches))
    finally:
        student.eval()
    return losses


def _tensors(tokenizer: TextTokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer.encode(texts)
    return torch.as_tensor(batch.input_ids), torch.as_tensor(batch.attention_mask)
