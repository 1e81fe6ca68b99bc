"""Synthetic reasoning tasks for zaya's built-in model: problems, worked solutions, held-out split,
and aggregation examples for Markovian RSA training.

    from zaya.tasks import builtin_test_set, sample_problems
    for p in builtin_test_set(200):
        p.text, p.answer, p.level

``python -m zaya.tasks build-data --out DIR`` writes the tokenizer and the training data of the
default-model recipe (``recipes/default-model.toml``); ``python -m zaya.tasks test-set`` writes the
held-out problems as JSONL for ``zaya eval --data``.
"""

from zaya.tasks.arithmetic import LEVELS, Problem, sample_problems, split_of

# The built-in evaluation set: held-out problems of these levels, drawn with this seed.
BUILTIN_LEVELS = (3, 4, 5)
BUILTIN_SEED = 0


def builtin_test_set(count: int = 200, levels=BUILTIN_LEVELS, seed: int = BUILTIN_SEED) -> list[Problem]:
    """``count`` held-out problems (never in any training data: see ``split_of``)."""
    return sample_problems(count, "test", levels, seed)


def problem_records(problems) -> list[dict]:
    """Problems as ``zaya eval`` JSONL records."""
    return [{"id": f"arith-{i}", "problem": p.text, "answer": str(p.answer), "level": p.level}
            for i, p in enumerate(problems)]


__all__ = ["LEVELS", "Problem", "sample_problems", "split_of", "builtin_test_set", "problem_records",
           "BUILTIN_LEVELS", "BUILTIN_SEED"]
