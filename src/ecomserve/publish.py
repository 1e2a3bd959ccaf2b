"""Live model updates: publish a new release into a running server's repository, roll back, list.

publish: build and verify the spec in a scratch repository (a failing build touches nothing live),
check it only replaces weights and keeps the live release's NDCG@5 (within serving.max_ndcg_drop),
copy it in as the next release, then have the server load it through Triton's model-control API
(explicit mode; protected by the admin key). Versioned models load the new release beside the old
one; `embed` switches last, so traffic moves in one step and is never refused. If the server cannot
load the release, the previous one is put back and the new one removed."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rich.console import Console

from ecomserve.errors import RepositoryError, ServerError
from ecomserve.files import write_text_atomically
from ecomserve.repository.builder import BUILD_INFO, build_repository, built_spec
from ecomserve.repository.quality import release_ndcg
from ecomserve.repository.releases import (
    add_release,
    check_compatible,
    keep_loaded,
    live_release,
    releases,
    remove_release,
    serve,
    versioned_models,
)
from ecomserve.server.control import ModelControl
from ecomserve.spec import PipelineSpec


def publish(
    spec: PipelineSpec, spec_dir: Path | None, repository: Path, control: ModelControl, console: Console
) -> int:
    """Build, verify and switch to a new release; returns its number."""
    previous = live_release(repository)
    with tempfile.TemporaryDirectory(dir=repository.parent, prefix=".ecomserve-candidate-") as work:
        candidate = Path(work) / repository.name
        console.print(f"building the candidate release (live: {previous}) …")
        info = build_repository(spec, candidate, spec_dir=spec_dir, console=console)
        check_compatible(repository, candidate)
        info["ndcg5"] = check_quality(repository, previous, candidate, spec, console)
        release = add_release(repository, candidate)
    keep = spec.serving.versions_loaded
    try:
        switch(repository, release, keep, control, handover_from=previous)
    except ServerError:
        console.print(f"[red]release {release} failed to load; back to {previous}[/]")
        switch(repository, previous, keep, control)
        remove_release(repository, release)
        raise
    _record(repository, release, info)
    return release


def check_quality(repository: Path, live: int, candidate: Path, spec: PipelineSpec, console: Console) -> dict:
    """The candidate's NDCG@5 against the live release's, on the same eval set, before anything goes live."""
    scores = {"live": release_ndcg(repository, live), "candidate": release_ndcg(candidate, 1, spec)}
    console.print(
        f"NDCG@5 on the eval set: live release {live} {scores['live']:.4f}, candidate {scores['candidate']:.4f}"
    )
    if scores["candidate"] < scores["live"] - spec.serving.max_ndcg_drop:
        raise RepositoryError(
            f"the candidate's NDCG@5 {scores['candidate']:.4f} is below the live release's {scores['live']:.4f} "
            f"by more than serving.max_ndcg_drop ({spec.serving.max_ndcg_drop}); nothing was published"
        )
    return scores


def rollback(repository: Path, control: ModelControl, to: int | None = None) -> tuple[int, int]:
    """Serve an earlier release again (default: the one before the live one); returns (from, to)."""
    live = live_release(repository)
    earlier = [r for r in releases(repository) if r < live]
    target = to if to is not None else (earlier[-1] if earlier else None)
    if target is None:
        raise RepositoryError(f"release {live} is the first one in {repository}: nothing to roll back to")
    if target not in releases(repository) or target == live:
        raise RepositoryError(f"release {target} is not an earlier release in {repository}: {releases(repository)}")
    switch(repository, target, built_spec(repository).serving.versions_loaded, control)
    return live, target


def switch(repository: Path, release: int, keep: int, control: ModelControl, handover_from: int | None = None) -> None:
    """Load `release` and make `embed` serve it. Triton reloads `embed` whenever a model it uses is
    loaded, so every version `embed` reads stays loaded at each step: the models load `release` beside
    the live one first (also going back, where `release` may have left the loaded window), then `embed`
    moves; going back, the newer releases leave the models last."""
    *models, embed = versioned_models(repository)
    live = live_release(repository)

    def load_models(embed_reads: int) -> None:
        keep_loaded(repository, release, keep, live=embed_reads)
        for model in models:
            control.load(model)
            control.wait_ready(model, release)

    load_models(embed_reads=live)
    serve(repository, release, handover_from)
    control.load(embed)
    control.wait_ready(embed, release)
    if release < live:
        load_models(embed_reads=release)


def _record(repository: Path, release: int, info: dict) -> None:
    path = repository / BUILD_INFO
    record = json.loads(path.read_text())
    record.setdefault("releases", {})[str(release)] = info
    write_text_atomically(path, json.dumps(record, indent=2) + "\n")
