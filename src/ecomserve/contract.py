"""The names every part of ecomserve agrees on: models, public tensors, the admin key, releases.

The repository builder, the python models, the client, the CLI, publishing and the benchmarks import
these instead of spelling the strings. Standard library only: the python stubs and the chart's
scripts read it too. `k8s/chart/ecomserve/files/reload_models.py` runs in a Kubernetes Job without
ecomserve installed, so it carries a generated copy of what it needs (`SCRIPT_NAMES`, `load_order`)
between markers; `python -m ecomserve.contract --write FILE` rewrites that block, `--check FILE` fails
when it is stale (tests/test_contract.py runs the check)."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Iterable
from pathlib import Path

# Public models: what clients call.
EMBED, RANK, CLASSIFY, SEARCH, SIMILAR = "embed", "rank", "classify", "search", "similar"
# Internal models: the fused layout's one python model, and the split layout's fusion step.
EMBEDDER, FUSION = "embedder", "fusion"
# Reserved as well: no encoder may take it (see ecomserve.spec.RESERVED_NAMES).
VOTE = "vote"


def tokenizer_model(encoder: str) -> str:
    """The split layout's tokenizer model of the encoder named `encoder`."""
    return f"{encoder}_tokenizer"


def encoder_model(encoder: str) -> str:
    """The split layout's encoder model of the encoder named `encoder`."""
    return f"{encoder}_encoder"


# Public tensors (KServe v2 input and output names).
TEXT, EMBEDDING = "TEXT", "EMBEDDING"
QUERY, CANDIDATES, SCORES, ENCODER_SCORES = "QUERY", "CANDIDATES", "SCORES", "ENCODER_SCORES"
LABELS, LABEL, VOTES = "LABELS", "LABEL", "VOTES"
TOP_K, IDS, TITLES, ITEM_IDS = "TOP_K", "IDS", "TITLES", "ITEM_IDS"
# search and similar: an optional JSON filter over catalog fields (ecomserve.index.filters).
FILTER = "FILTER"
# search: an optional retrieval mode (hybrid | dense | lexical) overriding the spec's search.mode.
MODE = "MODE"
# similar: an optional diversity (MMR) from 0 (by similarity only) to 1, overriding the spec's search.diversity.
DIVERSITY = "DIVERSITY"
# The tokenizer models' outputs (split layout, internal).
INPUT_IDS, ATTENTION_MASK = "INPUT_IDS", "ATTENTION_MASK"

# The header (HTTP) or metadata key (gRPC) that carries the admin key.
ADMIN_HEADER = "ecomserve-admin-key"
# Where ecomserve's tools, the front and the Kubernetes pods read the admin key from.
ADMIN_KEY_ENV = "ECOMSERVE_ADMIN_KEY"
# The optional inference API key (`Authorization: Bearer …` on every port): where the server and clients read it.
API_KEY_ENV = "ECOMSERVE_API_KEY"
# The header (HTTP) or metadata key (gRPC) that carries it, as `Bearer <key>` (RFC 6750; gRPC wants lower case).
API_KEY_HEADER = "authorization"

# Releases: every other model is versioned (one version per release); `embed`'s config names the
# release each step serves. The python heads are not versioned: they follow whatever release `embed`
# serves (search: the release its index names; similar embeds nothing, it reads the index's vectors).
UNVERSIONED = frozenset({RANK, CLASSIFY, SEARCH, SIMILAR})


def load_order(names: Iterable[str]) -> list[str]:
    """The versioned models among `names` in the order a release switch loads them: each once, the
    others in the given order, `embed` last (its config pins the release of every step)."""
    unique = [name for name in dict.fromkeys(names) if name not in UNVERSIONED]
    return [name for name in unique if name != EMBED] + [name for name in unique if name == EMBED]


# What the chart's reload Job needs, rendered into its script.
SCRIPT_NAMES = {"ADMIN_HEADER": ADMIN_HEADER, "EMBED": EMBED, "UNVERSIONED": tuple(sorted(UNVERSIONED))}
BEGIN = "# --- begin generated from ecomserve.contract (python -m ecomserve.contract --write FILE); do not edit ---"
END = "# --- end generated from ecomserve.contract ---"


def script_block() -> str:
    """The generated block of the chart's scripts: `SCRIPT_NAMES` and `load_order`, markers included."""
    constants = "".join(f"{name} = {value!r}\n" for name, value in SCRIPT_NAMES.items()).replace("'", '"')
    function = inspect.getsource(load_order).replace("Iterable[str]", "list[str]")
    return f"{BEGIN}\n{constants}\n\n{function}\n\n{END}\n"


def with_script_block(text: str) -> str:
    """`text` (a script with the markers) with its generated block rewritten."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no generated block: the script needs the lines {BEGIN!r} and {END!r}")
    return text[:start] + script_block() + text[end + len(END) + 1 :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecomserve.contract", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", type=Path, metavar="FILE", help="rewrite FILE's generated block")
    action.add_argument("--check", type=Path, metavar="FILE", help="fail if FILE's generated block is stale")
    args = parser.parse_args(argv)
    path = args.write or args.check
    text = path.read_text()
    expected = with_script_block(text)
    if args.write:
        if expected != text:
            path.write_text(expected)
        return 0
    if expected != text:
        print(f"{path}: the generated block differs from ecomserve.contract; run --write {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
