"""The benchmark suite behind `scoresde bench`: quality per NFE on exact mixtures (`quality`),
sampling speed and memory on real networks (`speed`), training throughput (`training`).

    scoresde bench --quick                    # or: python -m scoresde.bench --quick
"""
from .suite import main, run_parts

__all__ = ["main", "run_parts"]
