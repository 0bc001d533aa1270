"""How closely two sensitivity studies of the same model rank its groups.

    python benchmarks/study_ranks.py STUDY_A.json STUDY_B.json

Prints Spearman's rank correlation over the groups both rank, whether both rank the same group
first, and the overlap of their top five and of their recipes' kept layers. Used to check a
cheaper study design against the full one (docs/sensitivity.md, "Cost").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def spearman(a: list[str], b: list[str]) -> float:
    """Spearman's rho of two orderings of the same names (no ties: ranks are positions)."""
    shared = [name for name in a if name in set(b)]
    if len(shared) < 2:
        raise ValueError("fewer than two groups in common: no correlation to compute")
    rank_a = {name: i for i, name in enumerate(n for n in a if n in set(shared))}
    rank_b = {name: i for i, name in enumerate(n for n in b if n in set(shared))}
    n = len(shared)
    squares = sum((rank_a[name] - rank_b[name]) ** 2 for name in shared)
    return 1 - 6 * squares / (n * (n * n - 1))


def compared(first: dict, second: dict) -> dict:
    a = [entry["group"] for entry in first["ranking"]]
    b = [entry["group"] for entry in second["ranking"]]
    kept_a, kept_b = set(first["recipe"]["kept"]), set(second["recipe"]["kept"])
    return {
        "groups": len(set(a) & set(b)),
        "spearman_rho": round(spearman(a, b), 4),
        "same_first": a[0] == b[0],
        "first": [a[0], b[0]],
        "top5_overlap": len(set(a[:5]) & set(b[:5])),
        "kept_overlap": f"{len(kept_a & kept_b)} of {len(kept_a)} and {len(kept_b)}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs=2, type=Path)
    args = parser.parse_args()
    first, second = (json.loads(path.read_text()) for path in args.studies)
    for key, value in compared(first, second).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
