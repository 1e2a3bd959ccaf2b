"""Releases inside a live model repository: numbered versions that switch all at once.

A release N is version N of every versioned model (the fused `embedder`, or each tokenizer, encoder
and `fusion`) plus version N of the `embed` ensemble. `embed`'s config says which release is live:
its version policy serves only N and its steps are pinned to version N of each model, so one request
never mixes a tokenizer of one release with an encoder of another, and the response cache (keyed by
model version) never answers from an older release. Versioned models keep the last few releases
loaded (`serving.versions_loaded`), so a rollback is only a new `embed` config.

Only the on-disk side lives here; `ecomserve.publish` tells the running server to load it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as pb

from ecomserve.contract import EMBED, UNVERSIONED, load_order
from ecomserve.errors import RepositoryError
from ecomserve.files import write_text_atomically
from ecomserve.repository.configs import parse_pbtxt, to_pbtxt

CONFIG = "config.pbtxt"


def read_config(repository: Path, model: str) -> pb.ModelConfig:
    return parse_pbtxt((repository / model / CONFIG).read_text())


def write_config(repository: Path, config: pb.ModelConfig) -> None:
    """Atomically: Triton may read the file at any moment (a load, a restart)."""
    write_text_atomically(repository / config.name / CONFIG, to_pbtxt(config))


def versioned_models(repository: Path) -> list[str]:
    """The models a release is made of, in load order (`embed` last: it depends on the others)."""
    return load_order([*sorted(p.parent.name for p in repository.glob(f"*/{CONFIG}")), EMBED])


def releases(repository: Path) -> list[int]:
    return sorted(int(p.name) for p in (repository / EMBED).iterdir() if p.is_dir() and p.name.isdigit())


def live_release(repository: Path) -> int:
    """The release `embed` serves: its pinned policy, or the only release of a fresh build."""
    policy = read_config(repository, EMBED).version_policy
    if policy.HasField("specific"):
        return max(policy.specific.versions)
    return releases(repository)[-1]


def check_compatible(live: Path, candidate: Path) -> None:
    """A release may change weights and tokenizers, not the models' interfaces or settings: those are
    shared by every version of a model, so the older releases kept for rollback would break."""
    live_models, new_models = set(versioned_models(live)), set(versioned_models(candidate))
    if live_models != new_models:
        raise RepositoryError(
            f"the new spec builds models {sorted(new_models)}, the live repository has {sorted(live_models)}: "
            "a release can only replace weights; build a new repository and restart (or roll out a new deployment)"
        )
    for model in sorted(live_models | UNVERSIONED):
        present = (live / model / CONFIG).is_file(), (candidate / model / CONFIG).is_file()
        if present == (False, False):  # an optional head neither spec builds (search and similar need `search:`)
            continue
        if present != (True, True):
            raise RepositoryError(
                f"the new spec {'adds' if present[1] else 'removes'} the model '{model}': a release can only "
                "replace weights; build a new repository and restart"
            )
        old, new = unpinned(read_config(live, model)), unpinned(read_config(candidate, model))
        if old != new:
            raise RepositoryError(
                f"the new spec changes the config of '{model}' (shapes, runtime, batching, limits or prompts): "
                "a release can only replace weights; build a new repository and restart"
            )


def add_release(live: Path, candidate: Path) -> int:
    """Copy the candidate's version 1 of every versioned model into `live` as the next release.
    Nothing is served from it until `serve` names it."""
    number = max(releases(live)) + 1
    for model in versioned_models(live):
        source, target = candidate / model / "1", live / model / str(number)
        staged = target.with_name(f".{number}.incoming")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(source, staged)
        os.replace(staged, target)
    return number


def keep_loaded(repository: Path, release: int, keep: int, live: int) -> None:
    """Versioned models keep `release` and up to keep-1 older releases loaded, and the `live` one that
    `embed` still reads until it moves (config files only)."""
    kept = sorted({*[r for r in releases(repository) if r <= release][-keep:], live})
    for model in versioned_models(repository)[:-1]:
        config = read_config(repository, model)
        config.version_policy.CopyFrom(pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=kept)))
        write_config(repository, config)


def serve(repository: Path, release: int, handover_from: int | None = None) -> None:
    """`embed` reads every step from `release` and serves only it (config file only). When publishing,
    the live version (`handover_from`) stays loaded beside the new one: a version dropped from the policy
    is unloaded at once, and unversioned requests move to the new one (the highest) when it is ready."""
    embed = read_config(repository, EMBED)
    serving = sorted({release} | ({handover_from} if handover_from is not None else set()))
    embed.version_policy.CopyFrom(pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=serving)))
    for step in embed.ensemble_scheduling.step:
        step.model_version = release
    write_config(repository, embed)


def remove_release(repository: Path, release: int) -> None:
    for model in versioned_models(repository):
        shutil.rmtree(repository / model / str(release), ignore_errors=True)


def unpinned(config: pb.ModelConfig) -> pb.ModelConfig:
    """The config without what a release changes: the versions it serves."""
    copy = pb.ModelConfig()
    copy.CopyFrom(config)
    copy.ClearField("version_policy")
    for step in copy.ensemble_scheduling.step:
        step.model_version = -1
    return copy
