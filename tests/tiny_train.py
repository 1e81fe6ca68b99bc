"""Tiny training configs and corpora for the trainer tests (each run takes well under a second)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from tests.tiny_tokenizer import make_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("the quick brown fox jumps over lazy dog what is twelve plus thirty answer forty two hello how can "
         "assist you today let me think about this step by step sea sky wind function returns value").split()

TINY_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  moe_intermediate_size=32, num_experts=4, router_hidden_size=16, max_position_embeddings=256)


def write_corpus(folder: Path, docs: int = 12, words: int = 120, seed: int = 0) -> Path:
    """Text files of seeded random words, one document each."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n")
    return folder


def write_chat(path: Path, n: int = 8, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            if i % 2:
                rec = {"problem": f"What is {a} + {b}?", "solution": f"The answer is {a + b}."}
            else:
                rec = {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                    {"role": "assistant", "content": f"The answer is {a + b}.",
                                     "reasoning_content": "let me think step by step"}]}
            f.write(json.dumps(rec) + "\n")
    return path


def config_dict(tmp: Path, **sections) -> dict:
    """A complete config dict; ``sections`` update individual sections, e.g. train={"steps": 4}."""
    tok = tmp / "tok"
    if not (tok / "tokenizer.json").is_file():
        make_tokenizer_dir(tok)
    corpus = tmp / "corpus"
    if not corpus.is_dir():
        write_corpus(corpus)
    raw = {
        "model": {"tokenizer": str(tok), **TINY_SHAPE},
        "data": {"train": [str(corpus / "*.txt")], "seq_len": 32, "holdout": 0.2},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "balance": {},
        "train": {"out_dir": str(tmp / "run"), "steps": 6, "global_batch": 4, "micro_batch": 2,
                  "progress": False, "eval_batches": 2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def write_config(tmp: Path, name: str = "cfg.toml", **sections) -> Path:
    """The same as a TOML file (for subprocess runs)."""
    return write_toml(tmp / name, config_dict(tmp, **sections))


def write_toml(path: Path, raw: dict) -> Path:
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def losses(metrics: Path) -> dict[int, float]:
    out = {}
    for line in Path(metrics).read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(config: Path, *args: str, ranks: int = 2) -> subprocess.Popen:
    """``torchrun --nproc-per-node RANKS -m zaya.train CONFIG ARGS`` on CPU (gloo), started in the background."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(ranks), "-m", "zaya.train", str(config), "--no-progress", *args],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out = proc.communicate(timeout=timeout)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    return out
