"""Embedding distillation: a pruned encoder learns to reproduce the full encoder's vectors and rankings.

Loss per batch: MSE between the unit vectors, plus (1 - cosine), plus `ranking_weight` times an in-batch ranking
term (see `ranking_loss`). The teacher's vectors are computed once, in chunks. With a checkpoint_dir, the teacher's
vectors and the student after each epoch (weights, optimizer, losses) are saved there, and a rerun of the same
student, spec and corpus resumes after the last finished epoch (the teacher's vectors are reused by any student).
Minutes on 2 CPU cores for MiniLM on the shipped corpus. On the shared 2-core machine, a generated corpus of 8,000
texts took ~6 min for the teacher's vectors and ~13 min per epoch for a 3-layer student (~10 texts/s)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.nn import functional as F

from ecomserve.export.pooled_encoder import PooledEncoder
from ecomserve.spec import DistillSpec
from ecomserve.tokenization import TextTokenizer

TEACHER_CHUNK = 256  # texts per teacher forward pass: bounded activations, a progress step every chunk
# Fields that change neither the targets nor what an epoch does: a run with more epochs resumes a shorter one.
_NOT_HASHED = {"epochs", "checkpoint_dir"}


@dataclass
class DistillResult:
    losses: list[float] = field(default_factory=list)  # mean loss per epoch, resumed epochs included
    resumed_epochs: int = 0  # epochs taken from a checkpoint rather than trained in this call


Batch = tuple[torch.Tensor, torch.Tensor]


def distill(
    student: PooledEncoder,
    teacher: PooledEncoder,
    tokenizer: TextTokenizer,
    texts: list[str],
    spec: DistillSpec,
    progress: Progress | None = None,
) -> DistillResult:
    """Train `student` in place (resuming from spec.checkpoint_dir when it holds this run's checkpoint)."""
    store = _Checkpoints.for_run(spec, student, teacher, tokenizer, texts)
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec.learning_rate)
    result = store.restore(student, optimizer, spec.epochs) if store else DistillResult()
    if result.resumed_epochs == spec.epochs:
        return result
    batches = [_tensors(tokenizer, texts[i : i + spec.batch_size]) for i in range(0, len(texts), spec.batch_size)]
    # A caller's progress is already live (the build's); one made here is shown for the length of this call.
    own = progress is None
    progress = progress or Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn()
    )
    with progress if own else contextlib.nullcontext():
        targets = _teacher_vectors(teacher, tokenizer, texts, store, progress)
        _train(student, optimizer, batches, targets, spec, result, store, progress)
    return result


def _train(
    student: PooledEncoder,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    targets: torch.Tensor,
    spec: DistillSpec,
    result: DistillResult,
    store: _Checkpoints | None,
    progress: Progress,
) -> None:
    """The epochs after result.resumed_epochs; each epoch's mean loss is appended to result.losses."""
    task = progress.add_task("distil", total=(spec.epochs - result.resumed_epochs) * len(batches))
    torch.manual_seed(spec.seed + result.resumed_epochs)  # dropout: a resumed epoch draws as a full run's would
    student.train()
    try:
        for epoch in range(result.resumed_epochs, spec.epochs):
            order = list(range(len(batches)))
            random.Random(spec.seed + epoch).shuffle(order)
            total = 0.0
            for index in order:
                vectors = student(*batches[index])
                start = index * spec.batch_size  # every batch but the last is full
                target = targets[start : start + len(vectors)]
                loss = distill_loss(vectors, target, spec)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
                progress.update(task, advance=1, description=f"distil epoch {epoch + 1}/{spec.epochs} loss {loss:.4f}")
            result.losses.append(total / len(batches))
            if store:
                store.save_epoch(student, optimizer, result.losses)
    finally:
        student.eval()


def distill_loss(vectors: torch.Tensor, target: torch.Tensor, spec: DistillSpec) -> torch.Tensor:
    """MSE on the unit vectors (scaled by the width, so it reads as a squared distance) + (1 - cosine), plus the
    weighted ranking term."""
    loss = F.mse_loss(vectors, target) * vectors.shape[1] + (1 - (vectors * target).sum(dim=1)).mean()
    if spec.ranking_weight:
        loss = loss + spec.ranking_weight * ranking_loss(vectors, target, spec.ranking_temperature)
    return loss


def ranking_loss(vectors: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence, per text of the batch, from the teacher's softmax over its similarities to the other texts
    to the student's: the student learns the teacher's in-batch ranking, near neighbours weighted most.

    Why soft targets and not InfoNCE: InfoNCE makes each text's own teacher vector the one positive and every other
    text a negative, which pushes apart the near-duplicates and matching queries a family batch holds, exactly the
    neighbours the teacher ranks high. Why student·student similarities: serving compares two student vectors; the
    MSE and cosine terms already tie each student vector to its teacher vector. The diagonal (a text with itself,
    always 1) is left out. Zero when the student ranks as the teacher does; differentiable in `vectors`."""
    size = len(vectors)
    if size < 3:  # one other text: a softmax over one value carries no ranking
        return vectors.sum() * 0.0
    off_diagonal = ~torch.eye(size, dtype=torch.bool, device=vectors.device)
    student = (vectors @ vectors.T)[off_diagonal].view(size, size - 1) / temperature
    teacher = (target @ target.T)[off_diagonal].view(size, size - 1) / temperature
    return F.kl_div(
        F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), log_target=True, reduction="batchmean"
    )


def _teacher_vectors(
    teacher: PooledEncoder, tokenizer: TextTokenizer, texts: list[str], store: _Checkpoints | None, progress: Progress
) -> torch.Tensor:
    """[len(texts), dim] unit vectors, computed once in chunks (or read from the checkpoint folder)."""
    saved = store.load_targets() if store else None
    if saved is not None:  # its file is named by a hash of these very texts
        return saved
    task = progress.add_task("teacher vectors", total=len(texts))
    chunks = []
    with torch.no_grad():  # not inference_mode: the targets enter the autograd graph of the loss
        for start in range(0, len(texts), TEACHER_CHUNK):
            chunk = texts[start : start + TEACHER_CHUNK]
            chunks.append(teacher(*_tensors(tokenizer, chunk)))
            progress.update(task, advance=len(chunk))
    targets = torch.cat(chunks)
    if store:
        store.save_targets(targets)
    return targets


def _tensors(tokenizer: TextTokenizer, texts: list[str]) -> Batch:
    batch = tokenizer.encode(texts)
    return torch.as_tensor(batch.input_ids), torch.as_tensor(batch.attention_mask)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class _Checkpoints:
    """Files of one run in the checkpoint folder, named by hashes of what decides them. The student file: the spec
    (less epochs), the texts, the tokenizer's truncation, the student's and teacher's starting weights (source,
    layers, width). The teacher's vectors: the texts, the truncation and the teacher only, so a run with another
    learning rate or student reuses them."""

    directory: Path
    run_key: str
    targets_key: str

    @classmethod
    def for_run(
        cls,
        spec: DistillSpec,
        student: PooledEncoder,
        teacher: PooledEncoder,
        tokenizer: TextTokenizer,
        texts: list[str],
    ) -> _Checkpoints | None:
        if spec.checkpoint_dir is None:
            return None
        inputs = ["\n".join(texts).encode(), f"max_seq_len={tokenizer.max_seq_len}".encode(), *_weights(teacher)]
        settings = json.dumps(spec.model_dump(exclude=_NOT_HASHED), sort_keys=True).encode()
        return cls(
            Path(spec.checkpoint_dir).expanduser(),
            run_key=_digest([settings, *inputs, *_weights(student)]),
            targets_key=_digest(inputs),
        )

    @property
    def student_file(self) -> Path:
        return self.directory / f"distill-{self.run_key}.pt"

    @property
    def targets_file(self) -> Path:
        return self.directory / f"teacher-{self.targets_key}.pt"

    def restore(self, student: PooledEncoder, optimizer: torch.optim.Optimizer, epochs: int) -> DistillResult:
        """Load the last finished epoch into `student` and `optimizer`; an empty result when there is none, or
        when it is past `epochs` (a shorter run starts over rather than return a student trained longer)."""
        if not self.student_file.is_file():
            return DistillResult()
        state = torch.load(self.student_file, weights_only=True)
        if len(state["losses"]) > epochs:
            return DistillResult()
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        return DistillResult(list(state["losses"]), len(state["losses"]))

    def save_epoch(self, student: PooledEncoder, optimizer: torch.optim.Optimizer, losses: list[float]) -> None:
        state = {"student": student.state_dict(), "optimizer": optimizer.state_dict(), "losses": list(losses)}
        _save_atomically(state, self.student_file)

    def load_targets(self) -> torch.Tensor | None:
        return torch.load(self.targets_file, weights_only=True) if self.targets_file.is_file() else None

    def save_targets(self, targets: torch.Tensor) -> None:
        _save_atomically(targets, self.targets_file)


def _weights(model: PooledEncoder) -> list[bytes]:
    return [
        part
        for name, tensor in model.state_dict().items()
        for part in (name.encode(), tensor.detach().cpu().contiguous().numpy().tobytes())
    ]


def _digest(parts: list[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two part lists hash alike by shifting
        digest.update(part)
    return digest.hexdigest()[:16]


def _save_atomically(obj, path: Path) -> None:
    """Write beside `path` and rename: a run killed mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(obj, partial)
    partial.replace(path)
