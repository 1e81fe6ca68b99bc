"""Bytes per rank for a config and strategy: what ``zaya train --dry-run`` prints and checks
against the device (every run also checks its state, before it builds the model).

* **state**: parameters, gradients and AdamW's two fp32 moments. Counted from the model itself,
  built on the meta device with the run's LoRA modules: a full fine-tune keeps fp32 weights and
  gradients; LoRA keeps the frozen base in the compute dtype and trains fp32 adapters; FSDP
  divides all of it by the number of ranks (``cpu_offload`` moves it to host memory); DDP adds its
  gradient buckets (a second copy of the gradients).
* **working set**: FSDP's gathered parameters: the root unit (embedding, tied head) from forward
  to backward, two blocks at a time (the one computing and the one prefetched), and one block's
  unsharded gradients before their reduce-scatter; under bf16 autocast (DDP), the bf16 copies of
  the fp32 weights that the backward pass keeps.
* **activations**: measured, not modelled: one and two blocks of the model's real widths (one
  expert, a short vocabulary) run a forward and the loss on a few tokens while autograd's
  saved-tensor hooks add up what is kept for backward; the growth per token, per block and per
  vocabulary entry scales to ``micro_batch x seq_len`` and the real depth and vocabulary. With
  activation checkpointing a block keeps only its inputs and one block is recomputed at a time.
  The backward pass adds the logits' gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from zaya.config import ZayaConfig
from zaya.errors import ConfigError
from zaya.lora import apply_lora
from zaya.model import ZayaForCausalLM
from zaya.tokenizer import Tokenizer
from zaya.train.build import model_config
from zaya.train.config import TrainConfig, lora_spec, tokenizer_dir
from zaya.train.loss import LossModel, chunk_tokens

GB = 1e9
ADAM_BYTES = 8  # two fp32 moments per trained parameter


@dataclass
class Estimate:
    strategy: str
    world: int
    params: int              # every parameter of the model (adapters included)
    trained: int
    rows: dict[str, int]     # per-rank bytes on the device, by what they hold
    host: dict[str, int]     # per-rank bytes moved to host memory (cpu_offload)
    notes: list[str]

    @property
    def state(self) -> int:
        return sum(v for k, v in self.rows.items() if k in ("parameters", "gradients", "optimizer"))

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def estimate(cfg: TrainConfig, config: ZayaConfig, world: int, *, activations: bool = True) -> Estimate:
    """Per-rank bytes; ``activations=False`` skips their measurement (the check every run makes
    before it starts needs only the state)."""
    spec = lora_spec(cfg)
    bf16 = cfg.train.precision == "bf16"
    fsdp = cfg.distributed.strategy == "fsdp"
    compute = 2 if bf16 else 4
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    if spec is not None:
        apply_lora(model, spec)
    base = 2 if bf16 and spec is not None else 4  # a frozen LoRA base is held in the compute dtype
    named = list(model.named_parameters())
    params = sum(p.numel() for _, p in named)
    trained = sum(p.numel() for _, p in named if p.requires_grad)
    state = {"parameters": sum(p.numel() * (4 if p.requires_grad else base) for _, p in named),
             "gradients": trained * 4, "optimizer": trained * ADAM_BYTES}
    notes = []
    if fsdp:
        state = {k: -(-v // world) for k, v in state.items()}
        working = _fsdp_working_set(model, compute, bf16)
    else:
        working = 0
        if world > 1:
            state["gradients"] *= 2
            notes.append("DDP's gradient buckets double the gradients")
        if bf16:  # autocast's bf16 copies of fp32 matrices, kept for backward
            working = sum(p.numel() * 2 for _, p in named if p.dim() >= 2 and p.requires_grad)
    host = {}
    if cfg.distributed.cpu_offload:
        host, state = state, {k: 0 for k in state}
    acts = activation_bytes(cfg, config) if activations else 0
    return Estimate(cfg.distributed.strategy, world, params, trained,
                    {**state, "working set": working, "activations": acts}, host, notes)


def _fsdp_working_set(model: ZayaForCausalLM, compute: int, bf16: bool) -> int:
    def numel(module, trained=False):
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trained)

    blocks = list(model.model.layers)
    block = max(numel(b) for b in blocks)
    root = numel(model) - sum(numel(b) for b in blocks)
    root_trained = numel(model, True) - sum(numel(b, True) for b in blocks)
    grads = max(max(numel(b, True) for b in blocks), root_trained) * (compute + (4 if bf16 else 0))
    return root * compute + 2 * block * compute + grads


# ----------------------------------------------------------------------------------- activations
def activation_bytes(cfg: TrainConfig, config: ZayaConfig) -> int:
    """Bytes kept for backward by one micro-batch (plus the logits' gradient)."""
    per_block, head, per_vocab = _measure(cfg, config)
    tokens = cfg.train.micro_batch * cfg.data.seq_len
    compute = 2 if cfg.train.precision == "bf16" else 4
    L, V = config.num_hidden_layers, config.vocab_size
    if cfg.train.activation_checkpointing:
        inputs = 4 * config.hidden_size + compute * config.router_hidden_size  # fp32 residual, router state
        blocks = L * inputs + per_block
    else:
        blocks = L * per_block
    # the logits of the tokens whose loss is computed at once (zaya.train.loss): what the loss keeps
    # (measured), the logits themselves and, in backward, their fp32 gradient and its cast
    live = min(tokens, chunk_tokens(V))
    logits = live * V * (per_vocab + 2 * compute + 4)
    return int(tokens * (blocks + head - per_vocab * _PROXY_VOCAB) + logits)


_PROXY_VOCAB = 256
_PROXY_TOKENS = (16, 32)


def _measure(cfg: TrainConfig, config: ZayaConfig) -> tuple[float, float, float]:
    """(bytes per token per block, per token for embedding + head at the proxy vocabulary, per
    token per vocabulary entry), from saved-tensor hooks on small models of the real widths."""
    return _measure_once(json.dumps(config.to_dict(), sort_keys=True), cfg.train.precision,
                         cfg.distributed.strategy, lora_spec(cfg))


@functools.lru_cache(maxsize=8)
def _measure_once(config_json: str, precision: str, strategy: str, spec) -> tuple[float, float, float]:
    config = ZayaConfig.from_dict(json.loads(config_json))
    slopes = {}
    for layers, vocab in ((1, _PROXY_VOCAB), (2, _PROXY_VOCAB), (1, 2 * _PROXY_VOCAB)):
        proxy = dataclasses.replace(config, num_hidden_layers=layers, vocab_size=vocab, num_experts=1,
                                    layer_types=config.layer_types[:layers], quantization=None, extra={})
        model, autocast = _proxy_model(proxy, precision, strategy, spec)
        b1, b2 = (_saved_bytes(model, autocast, n) for n in _PROXY_TOKENS)
        slopes[layers, vocab] = (b2 - b1) / (_PROXY_TOKENS[1] - _PROXY_TOKENS[0])
    per_block = slopes[2, _PROXY_VOCAB] - slopes[1, _PROXY_VOCAB]
    head = slopes[1, _PROXY_VOCAB] - per_block
    per_vocab = (slopes[1, 2 * _PROXY_VOCAB] - slopes[1, _PROXY_VOCAB]) / _PROXY_VOCAB
    return per_block, head, per_vocab


def _proxy_model(config: ZayaConfig, precision: str, strategy: str, spec) -> tuple[ZayaForCausalLM, bool]:
    """A model computing as the run will (its dtype, LoRA modules), and whether it autocasts."""
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():  # any finite values route and run the same ops; random draws would be slow
        for p in model.parameters():
            p.fill_(0.02)
        for b in model.buffers():
            b.zero_()
    if spec is not None:
        apply_lora(model, spec)
    bf16 = precision == "bf16"
    if bf16 and (spec is not None or strategy == "fsdp"):
        model.to(torch.bfloat16)  # FSDP's policy computes in bf16, and a LoRA base is held in it
    return model, bf16 and strategy != "fsdp"


def _saved_bytes(model: ZayaForCausalLM, autocast: bool, tokens: int) -> int:
    """What autograd keeps for backward after the forward and loss of ``tokens`` tokens (the
    parameters themselves not counted)."""
    seen: dict[int, int] = {}
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (1, tokens + 1), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            LossModel(model)(ids[:, :-1], ids[:, 1:], torch.ones(1, tokens))
    return sum(seen.values())


# ------------------------------------------------------------------------------------- device
def device_memory(device: torch.device, ranks: int | None = None) -> tuple[int, str]:
    """(bytes one rank may use, where that figure comes from); the ranks of one machine share its
    host memory."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{props.name}, {device}"
    ranks = ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    return total // ranks, f"host memory / {ranks} local rank{'s' if ranks > 1 else ''}"


def check(est: Estimate, env) -> None:
    """Stop before training when the state alone cannot fit the device."""
    have, where = device_memory(env.device)
    static = est.total - est.rows["activations"]
    if static > have:
        raise ConfigError(f"this run needs about {static / GB:.1f} GB per rank before activations "
                          f"({_summary(est)}), but a rank has {have / GB:.1f} GB ({where}); use more ranks with "
                          "distributed.strategy = 'fsdp', LoRA ([lora] r), or precision = 'bf16'. "
                          "`zaya train CONFIG --dry-run` shows the breakdown")


def _summary(est: Estimate) -> str:
    return ", ".join(f"{k} {v / GB:.1f}" for k, v in est.rows.items() if k != "activations")


def report(est: Estimate, cfg: TrainConfig, config: ZayaConfig, have: int, where: str) -> str:
    t = cfg.train
    lines = [f"model: {est.params / 1e9:.3f}B parameters ({est.trained / 1e9:.3f}B trained), "
             f"{config.num_hidden_layers} layers, {config.num_experts} experts, vocabulary {config.vocab_size}",
             f"run: {est.strategy} over {est.world} rank{'s' if est.world > 1 else ''}, {t.precision}, AdamW, "
             f"micro_batch {t.micro_batch} x seq_len {cfg.data.seq_len}"
             f"{', activation checkpointing' if t.activation_checkpointing else ''}"
             f"{', cpu_offload' if cfg.distributed.cpu_offload else ''}",
             "", f"{'per rank':<34}{'GB':>10}"]
    for name, value in est.rows.items():
        lines.append(f"{name + (' (estimate)' if name == 'activations' else ''):<34}{value / GB:>10.2f}")
        if name == "optimizer":
            lines.append(f"{'  = parameters + grads + optimizer':<34}{est.state / GB:>10.2f}")
    lines.append(f"{'  = total':<34}{est.total / GB:>10.2f}")
    for name, value in est.host.items():
        lines.append(f"{name + ' (host memory)':<34}{value / GB:>10.2f}")
    verdict = "fits" if est.total <= have else ("state fits, activations may not" if est.total - est.rows[
        "activations"] <= have else "does NOT fit")
    lines += [f"{'device memory':<34}{have / GB:>10.2f}  ({where}): {verdict}", *est.notes]
    return "\n".join(lines)


def dry_run(cfg: TrainConfig, ranks: int, device_gb: float | None = None) -> tuple[str, bool]:
    """The report for a config on ``ranks`` ranks, and whether it fits (``device_gb`` overrides
    the memory of this machine's device, to plan for another one)."""
    m = cfg.model
    if m.init_from and not (Path(m.init_from) / "config.json").is_file():
        raise ConfigError(f"{cfg.source}: model.init_from {m.init_from} has no config.json")
    tokenizer = None if m.init_from else Tokenizer.from_dir(tokenizer_dir(cfg))
    config = model_config(cfg, tokenizer, Path(m.init_from) if m.init_from else None)
    if cfg.distributed.strategy == "fsdp" and ranks < 2:
        raise ConfigError(f"{cfg.source}: distributed.strategy is 'fsdp'; pass the number of ranks (--ranks N, N >= 2)")
    est = estimate(cfg, config, ranks)
    if device_gb is not None:
        have, where = int(device_gb * GB), "as given"
    else:
        device = torch.device("cuda", 0) if torch.cuda.is_available() and cfg.train.device != "cpu" else \
            torch.device("cpu")
        have, where = device_memory(device, ranks)
    return report(est, cfg, config, have, where), est.total <= have
