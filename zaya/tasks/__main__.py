"""``python -m zaya.tasks``: build the default model's tokenizer and data, write test sets, install.

    python -m zaya.tasks build-data --out build/default-model      # tokenizer/ + train.jsonl
    python -m zaya.tasks build-mixture --out build/default-model/data5 --tokenizer DIR   # the last stage
    python -m zaya.tasks test-set --count 200 --out test.jsonl      # held-out problems for zaya eval
    python -m zaya.tasks self-data --model build/default-model/run4 --out build/self-data
    python -m zaya.tasks train recipes/default-model.toml --stop-after 240   # a run cut short
    python -m zaya.tasks install build/default-model/run            # latest checkpoint -> zaya/assets
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import torch

import zaya
from zaya.about import ABOUT_FILE
from zaya.rsa import LocalBackend
from zaya.rsa.prompts import ZYPHRA
from zaya.tasks import BUILTIN_LEVELS, builtin_test_set, problem_records
from zaya.tasks.aggregation import Tails, aggregation_example, plain_example, self_aggregation_examples
from zaya.tasks.arithmetic import LEVELS, reasoning, sample_problems
from zaya.tasks.offtopic import ABOUT
from zaya.tasks.vocab import save_tokenizer, train_tokenizer
from zaya.train.checkpoints import latest_checkpoint
from zaya.train.config import load_config
from zaya.train.loop import train as run_training

SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json")


def build_data(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels, weights = _levels(args.level_weights)
    n_agg = round(args.count * args.aggregation)
    problems = sample_problems(args.count + n_agg, "train", levels, args.seed, weights)
    plain, agg_problems = problems[:args.count], problems[args.count:]
    rng = random.Random(args.seed)

    # The tokenizer sees every kind of text the model will: problems, chains and the
    # aggregation template (rendered with a few correct chains as candidates).
    chain = lambda p: reasoning(p, args.result_line)  # noqa: E731
    corpus = [f"user\n{p.text}\nmodel\n{chain(p)}\n\n\\boxed{{{p.answer}}}" for p in problems[:20000]]
    corpus += [ZYPHRA(p.text, [chain(p)] * 4) for p in agg_problems[:2000]]
    corpus += [ZYPHRA(p.text, [chain(p)]) for p in agg_problems[:200]]
    if args.tokenizer:  # more data for a model that already has its tokenizer
        from tokenizers import Tokenizer as RawTokenizer

        tok = RawTokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
        tok_dir = Path(args.tokenizer)
    else:
        tok = train_tokenizer(corpus, args.vocab_size)
        tok_dir = save_tokenizer(tok, out / "tokenizer")
    tails = Tails(_bare(tok))

    records = [plain_example(p, args.result_line) for p in plain]
    for p in agg_problems:
        k = args.k if rng.random() < 0.8 else rng.randint(2, args.k)
        records.append(aggregation_example(p, rng, tails, k=k, tail=args.tail, q_range=args.candidate_accuracy,
                                           extra_step=args.extra_step, result_line=args.result_line))
    rng.shuffle(records)
    _write_jsonl(out / "train.jsonl", records)
    _write_jsonl(out / "test.jsonl", problem_records(builtin_test_set(args.test)))
    print(f"tokenizer: {tok_dir} ({tok.get_vocab_size()} tokens); "
          f"train.jsonl: {len(plain)} solve + {len(agg_problems)} aggregation examples; "
          f"test.jsonl: {args.test} held-out problems (levels {list(BUILTIN_LEVELS)})")
    return 0


def build_mixture_data(args) -> int:
    # start-up time: the mixture builder and the raw tokenizer load only for this subcommand
    from tokenizers import Tokenizer as RawTokenizer

    from zaya.tasks.mixture import MixtureSpec, build_mixture

    spec = MixtureSpec(everyday=args.everyday, offtopic=args.offtopic, chains=args.chains,
                       aggregation=args.aggregation, everyday_aggregation=args.everyday_aggregation)
    tok = RawTokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    records = build_mixture(spec, _bare(tok), args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", records)
    kinds = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print(f"train.jsonl: {len(records)} records ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))})")
    return 0


def _levels(level_weights: str) -> tuple[list[int], list[float]]:
    """``--level-weights "1,2,3"`` -> (levels 1..3, their weights)."""
    weights = [float(w) for w in level_weights.split(",")]
    return sorted(LEVELS)[:len(weights)], weights


def _unit_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise argparse.ArgumentTypeError(f"need 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def _bare(tok):
    """A `tokenizers.Tokenizer` with the ``encode(text, add_special_tokens=False) -> ids`` and
    ``decode(ids)`` interface RSA's tail rule expects."""

    class Bare:
        def encode(self, text, add_special_tokens=False):
            return tok.encode(text, add_special_tokens=add_special_tokens).ids

        def decode(self, ids):
            return tok.decode(list(ids), skip_special_tokens=False)

    return Bare()


def _checkpoint(path: str) -> Path | None:
    """A checkpoint directory as given, or a training run's latest complete checkpoint (None, with
    the error printed, when the run has none)."""
    src = Path(path)
    if not (src / "checkpoints").is_dir():
        return src
    src = latest_checkpoint(src)
    if src is None:
        print(f"error: {path} has no complete checkpoint", file=sys.stderr)
    return src


def _write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def self_data(args) -> int:
    """Solve examples plus self-aggregation examples sampled from a checkpoint (report §IV-B)."""
    src = _checkpoint(args.model)
    if src is None:
        return 1
    torch.manual_seed(args.seed)
    backend = LocalBackend(zaya.load(src))
    levels, weights = _levels(args.level_weights)
    problems = sample_problems(args.count + args.solve, "train", levels, f"self:{args.seed}", weights)
    rng = random.Random(args.seed)
    records, stats = self_aggregation_examples(backend, problems[:args.count], rng, k=args.k, tail=args.tail,
                                               samples=args.samples, per_problem=args.per_problem,
                                               max_tokens=args.max_tokens, seed=args.seed)
    records += [plain_example(p) for p in problems[args.count:]]
    rng.shuffle(records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", records)
    n_agg = args.count * args.per_problem
    print(f"{src}: {stats['samples']} own samples, {stats['sample_accuracy']:.1%} right; "
          f"train.jsonl: {n_agg} self-aggregation + {args.solve} solve examples")
    return 0


def write_test_set(args) -> int:
    levels = [int(x) for x in args.levels.split(",")]
    records = problem_records(sample_problems(args.count, "test", levels, args.seed))
    _write_jsonl(Path(args.out), records)
    print(f"wrote {len(records)} held-out problems to {args.out}")
    return 0


def install(args) -> int:
    src, dst = _checkpoint(args.checkpoint), Path(args.to)
    if src is None:
        return 1
    missing = [f for f in SHIPPED_FILES if not (src / f).is_file()]
    if missing:
        print(f"error: {src} lacks {missing}", file=sys.stderr)
        return 1
    dst.mkdir(parents=True, exist_ok=True)
    for f in SHIPPED_FILES:
        shutil.copy2(src / f, dst / f)
    (dst / ABOUT_FILE).write_text(ABOUT + "\n", encoding="utf-8")  # `zaya chat`'s banner line
    size = sum((dst / f).stat().st_size for f in SHIPPED_FILES + (ABOUT_FILE,))
    print(f"installed {src} -> {dst} ({size / 1e6:.1f} MB)")
    return 0


def train(args) -> int:
    """``zaya train CONFIG``, ending after step ``--stop-after`` of the config's schedule (the
    LR schedule still spans ``train.steps``), as the shipped run was stopped."""
    result = run_training(load_config(args.config, args.overrides), stop_after=args.stop_after)
    print(f"stopped at step {result.step}; checkpoint {result.checkpoint}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zaya.tasks", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-data", help="train the tokenizer and write the training data")
    b.add_argument("--out", required=True)
    b.add_argument("--count", type=int, default=40000, help="solve examples")
    b.add_argument("--aggregation", type=float, default=0.5,
                   help="aggregation examples per solve example")
    b.add_argument("--level-weights", default="1,2,3,3,3,2", help="weights of levels 1..6")
    b.add_argument("--k", type=int, default=4, help="candidates per aggregation prompt")
    b.add_argument("--tail", type=int, default=64, help="tokens carried per candidate (tau)")
    b.add_argument("--candidate-accuracy", type=_unit_range, default=(0.15, 0.9), metavar="LO,HI",
                   help="each aggregation example draws q ~ U(LO, HI); each candidate is right with probability q")
    b.add_argument("--extra-step", action="store_true",
                   help="a quarter of the wrong candidates add one step after the last operation")
    b.add_argument("--no-result-line", dest="result_line", action="store_false",
                   help="chains end at their last step, without the closing 'result N' line "
                        "(the format the recipe's first stages train on)")
    b.add_argument("--vocab-size", type=int, default=1024)
    b.add_argument("--tokenizer", help="reuse this tokenizer directory instead of training one")
    b.add_argument("--test", type=int, default=500, help="held-out problems in test.jsonl")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=build_data)
    m = sub.add_parser("build-mixture", help="the last stage's data: everyday questions, off-topic prompts, "
                       "chain and aggregation replay")
    m.add_argument("--out", required=True)
    m.add_argument("--tokenizer", required=True, help="the model's tokenizer directory (cuts aggregation tails)")
    m.add_argument("--everyday", type=int, default=80000, help="everyday questions")
    m.add_argument("--offtopic", type=int, default=6000, help="off-topic prompts")
    m.add_argument("--chains", type=int, default=12000, help="chain problems")
    m.add_argument("--aggregation", type=int, default=4000, help="aggregation prompts over chain candidates")
    m.add_argument("--everyday-aggregation", type=int, default=1000,
                   help="aggregation prompts over everyday candidates")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=build_mixture_data)
    s = sub.add_parser("self-data", help="self-aggregation data: candidates are a checkpoint's own samples")
    s.add_argument("--model", required=True, help="a checkpoint directory or a training run's out_dir")
    s.add_argument("--out", required=True)
    s.add_argument("--count", type=int, default=3000, help="problems sampled for aggregation examples")
    s.add_argument("--per-problem", type=int, default=2, help="aggregation prompts per problem")
    s.add_argument("--samples", type=int, default=8, help="own samples per problem (at temperature 1)")
    s.add_argument("--solve", type=int, default=3000, help="plain solve examples mixed in")
    s.add_argument("--level-weights", default="1,1,3,3,3,2", help="weights of levels 1..6")
    s.add_argument("--k", type=int, default=4, help="candidates per aggregation prompt")
    s.add_argument("--tail", type=int, default=64, help="tokens carried per candidate (tau)")
    s.add_argument("--max-tokens", type=int, default=96, help="token budget of each sample")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=self_data)
    t = sub.add_parser("test-set", help="write held-out problems as JSONL (problem, answer)")
    t.add_argument("--out", required=True)
    t.add_argument("--count", type=int, default=200)
    t.add_argument("--levels", default=",".join(map(str, BUILTIN_LEVELS)))
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=write_test_set)
    r = sub.add_parser("train", help="zaya train CONFIG, optionally stopping after a given step")
    r.add_argument("config")
    r.add_argument("--stop-after", type=int, help="end after this step (checkpoint written)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    r.set_defaults(func=train)
    i = sub.add_parser("install", help="copy a checkpoint's shipped files into the package")
    i.add_argument("checkpoint", help="a checkpoint directory, or a training run's out_dir")
    i.add_argument("--to", default=str(zaya.DEFAULT_MODEL))
    i.set_defaults(func=install)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
