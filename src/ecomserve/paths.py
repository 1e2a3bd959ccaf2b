"""Project folders the package reads from (specs, eval set, calibration and distillation text)."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXPORT_DIR = PROJECT_ROOT / "export"
CORPUS_DIR = EXPORT_DIR / "corpus"
EVAL_SET = EXPORT_DIR / "eval" / "relevance.json"


def corpus_lines(name: str) -> list[str]:
    """The non-empty lines of a shipped corpus file (titles.txt, queries.txt), stripped."""
    return [line.strip() for line in (CORPUS_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def corpus_texts() -> list[str]:
    """Shipped product titles and queries: calibration data for INT8, training data for distillation."""
    return corpus_lines("titles.txt") + corpus_lines("queries.txt")
