"""The training config: a TOML (or YAML) file with five sections, checked before anything runs.

    [model]    init_from = "ckpt/"  (fine-tune)  or the shape as config.json keys; tokenizer = "dir/"
    [data]     train = ["data/*.jsonl"], eval = [...] or holdout = 0.05, seq_len, packing
    [optim]    AdamW: lr, min_lr, warmup_steps, weight_decay, betas, eps, grad_clip
    [balance]  the router bias controller: enabled, lr, betas, eps, weight_decay
    [train]    out_dir, steps, global_batch, micro_batch, precision, seed, eval/save cadence,
               activation_checkpointing
    [distributed]  strategy = "ddp" or "fsdp", cpu_offload
    [lora]     r (0: full fine-tuning), alpha, dropout, targets

Relative paths are relative to the working directory, as in most trainers' configs. Every
problem (unknown key, wrong type, impossible value, missing file) raises a ``ConfigError``
that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zaya.config import ZayaConfig
from zaya.errors import ConfigError
from zaya.lora import LoraSpec

PRECISIONS = ("fp32", "bf16")
PACKINGS = ("stream", "bfd")
PROBLEM_STYLES = ("chat", "raw")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class ModelSection:
    init_from: str | None = None   # a checkpoint directory to fine-tune (loaded in fp32)
    tokenizer: str | None = None   # a directory with tokenizer.json; default: init_from's
    shape: dict[str, Any] = field(default_factory=dict)  # config.json keys for a model from scratch


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # files or glob patterns (** allowed)
    eval: list[str] = field(default_factory=list)   # held-out files; when empty, `holdout` applies
    holdout: float = 0.05          # fraction of the training documents held out for eval
    seq_len: int = 256             # tokens per packed sequence (inputs; targets are shifted by one)
    packing: str = "stream"        # stream: concatenate and cut; bfd: best-fit-decreasing whole documents
    chat_template: str | None = None  # a .jinja file; default: the tokenizer's, else zaya's
    problem_style: str = "chat"    # problem records as a user/assistant chat, or raw prompt+completion


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr: float = 3e-5           # the cosine decays to this at the last step
    warmup_steps: int = 100        # linear warm-up from lr/warmup_steps
    weight_decay: float = 0.1      # on matrices only; norms, scales and biases are not decayed
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0         # max global grad norm; 0 turns clipping off


@dataclass
class BalanceSection:
    # The ZAYA1 report gives the error signal (eq. 5) and "AdamW internally" but no gains. These
    # are the values of AMD's Primus port of ZAYA1 (zaya_balance_lr and torch's Adam defaults),
    # which we adopt as our defaults; see zaya/train/balance.py.
    enabled: bool = True
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class TrainSection:
    out_dir: str = ""              # checkpoints/, metrics.jsonl
    steps: int = 1000              # optimizer steps
    global_batch: int = 32         # sequences per optimizer step, over all ranks
    micro_batch: int = 4           # sequences per forward pass on one rank
    precision: str = "fp32"        # fp32, or bf16 autocast (weights and optimizer stay fp32)
    seed: int = 0                  # init, document shuffle, held-out split, sequence order
    eval_every: int = 0            # steps between evals (0: only at the end)
    eval_batches: int = 8          # micro-batches per eval, over all ranks
    save_every: int = 0            # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2      # complete checkpoints kept; older ones are deleted
    device: str = "auto"           # auto (cuda if present), cpu, cuda
    progress: bool = True          # tqdm bar on rank 0
    plot: str | None = None        # write a PNG of loss and load entropy here at the end
    activation_checkpointing: bool = False  # keep only each block's inputs; recompute the rest in backward


@dataclass
class DistributedSection:
    strategy: str = "ddp"          # ddp: every rank holds the model; fsdp: parameters, grads, optimizer sharded
    cpu_offload: bool = False      # fsdp: keep the sharded parameters, grads and optimizer state in CPU memory


@dataclass
class LoraSection:
    r: int = 0                     # adapter rank; 0 trains every weight (no LoRA)
    alpha: float = 16.0            # the update is scaled by alpha / r
    dropout: float = 0.0           # on the adapters' input (linear targets only)
    targets: list[str] = field(default_factory=lambda: ["attention"])  # see zaya/lora.py
    adapter: str | None = None     # start from this adapter (PEFT format) instead of fresh ones


@dataclass
class TrainConfig:
    model: ModelSection
    data: DataSection
    optim: OptimSection
    balance: BalanceSection
    train: TrainSection
    distributed: DistributedSection = field(default_factory=DistributedSection)
    lora: LoraSection = field(default_factory=LoraSection)
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        shape = out["model"].pop("shape")
        out["model"].update(shape)
        return out

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir)

    def train_files(self) -> list[Path]:
        return expand(self.data.train, "data.train")

    def eval_files(self) -> list[Path]:
        return expand(self.data.eval, "data.eval")


SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "balance": BalanceSection,
            "train": TrainSection, "distributed": DistributedSection, "lora": LoraSection}
_SHAPE_KEYS = {f.name for f in dataclasses.fields(ZayaConfig)} - {"extra", "quantization"}


# --------------------------------------------------------------------------------- reading
def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read and check a config file; ``overrides`` are ``section.key=value`` strings (TOML values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path} is YAML but PyYAML is not installed (pip install pyyaml), "
                              "or write the config as TOML") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    else:
        try:
            raw = _toml().loads(text)
        except _toml().TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw, source=str(path))


def _toml():
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib


def apply_override(raw: dict, item: str) -> None:
    """``train.steps=50`` or ``balance.enabled=false``: the value is read as TOML, else as a string."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=50)")
    try:
        parsed = _toml().loads(f"v = {value.strip()}")["v"]
    except _toml().TOMLDecodeError:
        parsed = value.strip()
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{parts[0]}] must be a table")
    section[parts[1]] = parsed


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a table of sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; expected {list(SECTIONS)}")
    parts = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table, got {table!r}")
        if name == "model":
            table = dict(table)
            shape = {k: table.pop(k) for k in list(table) if k in _SHAPE_KEYS}
            parts[name] = _build(cls, table, name, source)
            parts[name].shape = shape
        else:
            parts[name] = _build(cls, table, name, source)
    cfg = TrainConfig(**parts, source=source)
    validate(cfg)
    return cfg


def _build(cls, table: dict, section: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"shape"}
    unknown = sorted(set(table) - names)
    if unknown:
        hint = " (model shape keys are config.json names such as hidden_size)" if section == "model" else ""
        raise ConfigError(f"{source}: unknown key(s) {unknown} in [{section}]{hint}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}", source) for k, v in table.items()}
    return cls(**kwargs)


def _coerce(value, hint, key: str, source: str):
    """Check a value against a field's type; ints are accepted where floats are expected."""
    def bad(want):
        return ConfigError(f"{source}: {key} must be {want}, got {value!r}")

    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if type(None) in args:  # X | None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str) and item is str:
            value = [value]  # one file needs no list
        if not isinstance(value, list):
            raise bad(f"a list of {item.__name__}")
        return [_coerce(v, item, key, source) for v in value]
    raise AssertionError(f"unhandled config type {hint}")  # pragma: no cover


# ------------------------------------------------------------------------------ checking
def validate(cfg: TrainConfig) -> None:
    """Value checks that need no files; `check_files` does the rest before training."""
    src, m, d, o, b, t = cfg.source, cfg.model, cfg.data, cfg.optim, cfg.balance, cfg.train

    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(f"{src}: {message}")

    need(bool(t.out_dir), "train.out_dir must be set (checkpoints and metrics.jsonl go there)")
    need(bool(d.train), "data.train must list at least one file or glob pattern")
    if m.init_from:
        need(not m.shape, f"model.init_from is set, so the shape comes from its config.json; remove "
                          f"{sorted(m.shape)} from [model]")
    else:
        need(bool(m.tokenizer), "model.tokenizer must name a directory with tokenizer.json (or set model.init_from)")
    for key in ("steps", "global_batch", "micro_batch", "keep_checkpoints", "eval_batches"):
        need(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)}")
    for key in ("eval_every", "save_every"):
        need(getattr(t, key) >= 0, f"train.{key} must be >= 0, got {getattr(t, key)}")
    need(t.global_batch % t.micro_batch == 0, f"train.global_batch ({t.global_batch}) must be a multiple of "
                                              f"train.micro_batch ({t.micro_batch})")
    need(t.precision in PRECISIONS, f"train.precision must be one of {list(PRECISIONS)}, got {t.precision!r}")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}")
    need(d.seq_len >= 2, f"data.seq_len must be >= 2, got {d.seq_len}")
    need(0.0 <= d.holdout < 1.0, f"data.holdout must be in [0, 1), got {d.holdout}")
    need(d.packing in PACKINGS, f"data.packing must be one of {list(PACKINGS)}, got {d.packing!r}")
    need(d.problem_style in PROBLEM_STYLES,
         f"data.problem_style must be one of {list(PROBLEM_STYLES)}, got {d.problem_style!r}")
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, optim.lr], got {o.min_lr}")
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 turns it off), got {o.grad_clip}")
    need(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    need(b.lr > 0, f"balance.lr must be > 0, got {b.lr}")
    need(b.eps > 0, f"balance.eps must be > 0, got {b.eps}")
    need(b.weight_decay >= 0, f"balance.weight_decay must be >= 0, got {b.weight_decay}")
    for name, betas in (("optim.betas", o.betas), ("balance.betas", b.betas)):
        need(len(betas) == 2 and all(0 <= x < 1 for x in betas), f"{name} must be two numbers in [0, 1), "
                                                                  f"got {betas}")
    dist, lora = cfg.distributed, cfg.lora
    need(dist.strategy in STRATEGIES, f"distributed.strategy must be one of {list(STRATEGIES)}, got {dist.strategy!r}")
    need(not dist.cpu_offload or dist.strategy == "fsdp", "distributed.cpu_offload needs distributed.strategy = 'fsdp'")
    need(lora.r >= 0, f"lora.r must be >= 0 (0 turns LoRA off), got {lora.r}")
    need(lora.r or not lora.adapter, "lora.adapter needs the [lora] settings it was trained with (lora.r > 0)")
    if lora.r:
        need(bool(m.init_from), "LoRA adapts a trained model: set model.init_from (or lora.r = 0 to train from scratch)")
        try:
            lora_spec(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{src}: {exc}") from None


def lora_spec(cfg: TrainConfig) -> LoraSpec | None:
    """The run's LoRA settings as a ``zaya.lora.LoraSpec``, or None for full fine-tuning."""
    lora = cfg.lora
    return LoraSpec(lora.r, lora.alpha, lora.dropout, tuple(lora.targets)) if lora.r else None


def check_files(cfg: TrainConfig) -> None:
    """Every path the run will read exists (called before any model is built)."""
    src, m = cfg.source, cfg.model
    if m.init_from and not (Path(m.init_from) / "config.json").is_file():
        raise ConfigError(f"{src}: model.init_from {m.init_from} is not a checkpoint directory (no config.json)")
    if cfg.lora.adapter and not (Path(cfg.lora.adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"{src}: lora.adapter {cfg.lora.adapter} is not an adapter directory (no adapter_config.json)")
    tok = tokenizer_dir(cfg)
    if not (tok / "tokenizer.json").is_file():
        key = "model.tokenizer" if m.tokenizer else "model.init_from"
        raise ConfigError(f"{src}: {key} {tok} has no tokenizer.json")
    if cfg.data.chat_template and not Path(cfg.data.chat_template).is_file():
        raise ConfigError(f"{src}: data.chat_template {cfg.data.chat_template} does not exist")
    cfg.train_files()
    cfg.eval_files()


def tokenizer_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.model.tokenizer or cfg.model.init_from)


def expand(patterns: list[str], key: str) -> list[Path]:
    """Files named by paths or glob patterns, sorted within each pattern; none may come up empty."""
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not found:
                raise ConfigError(f"{key}: the pattern {pattern!r} matches no files")
            files.extend(found)
        else:
            path = Path(pattern)
            if not path.is_file():
                raise ConfigError(f"{key}: {path} does not exist" + (" (it is a directory; use a glob such as "
                                                                     f"'{path}/*.jsonl')" if path.is_dir() else ""))
            files.append(path)
    return list(dict.fromkeys(files))
