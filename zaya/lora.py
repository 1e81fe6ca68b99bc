"""LoRA adapters for ZAYA models (Hu et al., arXiv 2106.09685), stored in PEFT's format.

An adapter adds a trainable low-rank update to frozen weights: ``W x + (alpha / r) B A x`` with
``A`` (r, in) drawn like a Linear's weight and ``B`` (out, r) zero, so training starts from the
base model exactly. Targets are named as PEFT names them:

* **linear layers** by module name suffix: ``q_proj``, ``k_proj``, ``v_proj_current``,
  ``v_proj_delayed``, ``o_proj`` (alias ``attention``), or any other ``nn.Linear`` such as
  ``gate.down_proj`` (the router) or ``lm_head``;
* **expert stacks** by parameter name suffix: ``mlp.experts.gate_up_proj`` (E, 2I, H) and
  ``mlp.experts.down_proj`` (E, H, I) (alias ``experts``).

Experts get **one low-rank pair per expert** (``A`` (E, r, in), ``B`` (E, out, r)), not one pair
shared by all of them. Routing is top-1, so a token multiplies by exactly one expert's pair either
way: the compute per token is the same, only the parameter count is E times larger (105M instead
of 6.6M for ZAYA1-8B at r=16, about 1.7 GB more with fp32 AdamW state). In exchange each expert
can move on its own, a shared delta would push every expert the same way (working against the
specialisation the router balances for), and per-expert pairs are what PEFT's
``target_parameters`` stores for stacked experts, so the file loads with ``peft`` onto
transformers' ``ZayaForCausalLM`` unchanged (``benchmarks/lora_experts.py`` measures both).

Files (read and written by ``zaya.checkpoint.adapters``): ``adapter_config.json`` (PEFT's
``LoraConfig``) and ``adapter_model.safetensors`` with PEFT's names (``base_model.model.<module>.lora_A.weight``; stacked experts flattened as PEFT's
``ParamWrapper`` does, ``A`` as (E*r, in) and ``B`` as (out, r*E), the two stacks of one layer
nested in registration order: ``gate_up_proj`` inside as ``experts.base_layer``). The base
model's shape is recorded in the safetensors metadata so an adapter is never applied to another
architecture silently.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zaya.config import ZayaConfig
from zaya.errors import CheckpointError, ConfigError
from zaya.model import ZayaExperts

ATTENTION = ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed", "o_proj")
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ALIASES = {"attention": ATTENTION, "experts": EXPERTS}
EXPERT_STACKS = ("gate_up_proj", "down_proj")  # registration order: PEFT nests the first innermost
PREFIX = "base_model.model."
# config.json keys that fix every tensor shape: an adapter records them and checks them on load
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "moe_intermediate_size", "num_experts", "router_hidden_size")


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("lora.targets must name at least one layer")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def expanded(self) -> list[str]:
        out: list[str] = []
        for t in self.targets:
            out.extend(ALIASES.get(t, (t,)))
        return list(dict.fromkeys(out))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


# ----------------------------------------------------------------------------------------- modules
class LoraLinear(nn.Module):
    """A frozen linear layer (its own ``weight``/``bias``, so state-dict names stay the base's)
    plus ``lora_A`` (r, in) and ``lora_B`` (out, r)."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **like))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        a = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        return y + F.linear(a, self.lora_B.to(x.dtype)) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update the adapter adds to ``weight``, in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


class LoraExperts(ZayaExperts):
    """Stacked experts with one low-rank pair per expert on ``gate_up_proj`` and/or ``down_proj``."""

    def __init__(self, base: ZayaExperts, r: int, scaling: float, stacks: tuple[str, ...]):
        nn.Module.__init__(self)
        self.num_experts = base.num_experts
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.scaling, self.stacks = scaling, tuple(s for s in EXPERT_STACKS if s in stacks)
        for stack in self.stacks:
            w = getattr(self, stack)
            E, N, K = w.shape
            like = dict(device=w.device, dtype=w.dtype)
            setattr(self, f"{_short(stack)}_lora_A", nn.Parameter(torch.zeros(E, r, K, **like)))
            setattr(self, f"{_short(stack)}_lora_B", nn.Parameter(torch.zeros(E, N, r, **like)))

    def _apply_stack(self, stack: str, e: int, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, getattr(self, stack)[e])
        if stack in self.stacks:
            a = getattr(self, f"{_short(stack)}_lora_A")[e].to(x.dtype)
            b = getattr(self, f"{_short(stack)}_lora_B")[e].to(x.dtype)
            y = y + F.linear(F.linear(x, a), b) * self.scaling
        return y

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._apply_stack("gate_up_proj", e, x).chunk(2, dim=-1)
        return self._apply_stack("down_proj", e, F.silu(gate) * up)

    def delta(self, stack: str) -> torch.Tensor:
        a, b = (getattr(self, f"{_short(stack)}_lora_{k}").float() for k in "AB")
        return torch.bmm(b, a) * self.scaling


def _short(stack: str) -> str:
    return stack.removesuffix("_proj")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# ----------------------------------------------------------------------------------------- applying
def find_targets(model: nn.Module, spec: LoraSpec) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """(linear module names, {experts module name: stacks}) the spec's targets select; a target
    that selects nothing, or both a linear layer and an expert stack, is an error."""
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoraLinear))]
    experts = [n for n, m in model.named_modules() if isinstance(m, ZayaExperts)]
    hit_linear: set[str] = set()
    hit_experts: dict[str, set[str]] = {}
    for target in spec.expanded():
        lin = [n for n in linears if _matches(n, target)]
        stk = [(n, s) for n in experts for s in EXPERT_STACKS if _matches(f"{n}.{s}", target)]
        if lin and stk:
            raise ConfigError(f"lora target {target!r} names both linear layers ({lin[0]}) and expert stacks "
                              f"({stk[0][0]}.{stk[0][1]}); write e.g. 'gate.{target}' or 'experts.{target}'")
        if not lin and not stk:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(f"lora target {target!r} matches no linear layer or expert stack of this model; "
                              f"linear layers: {', '.join(leaves)}; expert stacks: {', '.join(EXPERTS)}; "
                              f"aliases: {', '.join(ALIASES)}")
        hit_linear.update(lin)
        for n, s in stk:
            hit_experts.setdefault(n, set()).add(s)
    return sorted(hit_linear), {n: tuple(s for s in EXPERT_STACKS if s in v) for n, v in sorted(hit_experts.items())}


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Freeze the model and swap adapter modules in (on any device, meta included); the adapter
    weights start at zero: call ``init_adapters`` for training. Returns the adapted names."""
    if any(isinstance(m, (LoraLinear, LoraExperts)) for m in model.modules()):
        raise ConfigError("this model already carries LoRA adapters")
    linears, experts = find_targets(model, spec)
    if spec.dropout and experts:
        raise ConfigError("lora.dropout must be 0 when expert stacks are targeted: PEFT's adapters on parameters "
                          "have no dropout, so the adapter could not be loaded there")
    model.requires_grad_(False)
    for name in linears:
        _set_module(model, name, LoraLinear(model.get_submodule(name), spec.r, spec.scaling, spec.dropout))
    for name, stacks in experts.items():
        _set_module(model, name, LoraExperts(model.get_submodule(name), spec.r, spec.scaling, stacks))
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    return linears + [f"{n}.{s}" for n, ss in experts.items() for s in ss]


def is_adapter(name: str) -> bool:
    return re.search(r"(^|\.|_)lora_[AB]$", name) is not None


def adapter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if is_adapter(n)]


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int, assign: Callable | None = None) -> None:
    """``A`` uniform in +-1/sqrt(in) (a Linear's default init, PEFT's too), ``B`` zero. The values
    depend only on the seed and the names, so every rank and every world size draws the same;
    ``assign(param, full_value)`` stores a value (a sharded trainer copies its own rows)."""
    assign = assign or (lambda p, v: p.copy_(v))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("lora_A"):
            bound = 1 / math.sqrt(p.shape[-1])
            assign(p, torch.empty(p.shape).uniform_(-bound, bound, generator=gen))
        elif name.endswith("lora_B"):
            assign(p, torch.zeros(p.shape))


# ------------------------------------------------------------------------------------- merging
@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in fp32, then the weight's dtype) and put plain
    modules back: the model computes what base + adapter computed, at the base's cost."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLinear):
            m.weight.copy_((m.weight.float() + m.delta()).to(m.weight.dtype))
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            _set_module(model, name, plain)
        elif isinstance(m, LoraExperts):
            for stack in m.stacks:
                w = getattr(m, stack)
                w.copy_((w.float() + m.delta(stack)).to(w.dtype))
            plain = ZayaExperts.__new__(ZayaExperts)
            nn.Module.__init__(plain)
            plain.num_experts, plain.gate_up_proj, plain.down_proj = m.num_experts, m.gate_up_proj, m.down_proj
            _set_module(model, name, plain)
    return model


# --------------------------------------------------------------------------------- PEFT format
def _layout(model: nn.Module, spec: LoraSpec) -> list[tuple[str, str, tuple[int, ...], str | None]]:
    """(PEFT name, zaya name, zaya shape, expert factor or None) of every adapter tensor the spec
    puts on this model (with or without the adapter modules already in place)."""
    linears, experts = find_targets(model, spec)
    rows = []
    for name in linears:
        m = model.get_submodule(name)
        for k, shape in (("A", (spec.r, m.in_features)), ("B", (m.out_features, spec.r))):
            rows.append((f"{PREFIX}{name}.lora_{k}.weight", f"{name}.lora_{k}", shape, None))
    for name, stacks in experts.items():
        m = model.get_submodule(name)
        for stack in stacks:
            E, N, K = getattr(m, stack).shape
            # PEFT wraps one parameter per ParamWrapper; the first one wrapped sits innermost (base_layer)
            nested = "base_layer." * (len(stacks) - 1 - stacks.index(stack))
            for k, shape in (("A", (E, spec.r, K)), ("B", (E, N, spec.r))):
                rows.append((f"{PREFIX}{name}.{nested}lora_{k}.weight", f"{name}.{_short(stack)}_lora_{k}", shape, k))
    return rows


def to_peft(state: dict[str, torch.Tensor], model: nn.Module, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """zaya adapter tensors -> PEFT's names and layouts (experts: A (E*r, in), B (out, r*E))."""
    out = {}
    for peft_name, ours, shape, factor in _layout(model, spec):
        t = state[ours]
        if factor == "A":
            t = t.reshape(shape[0] * shape[1], shape[2])
        elif factor == "B":
            t = t.permute(1, 2, 0).reshape(shape[1], shape[2] * shape[0])
        out[peft_name] = t.contiguous()
    return out


def from_peft(tensors: dict[str, torch.Tensor], model: nn.Module, spec: LoraSpec, where: Path
              ) -> dict[str, torch.Tensor]:
    """PEFT-named tensors -> zaya adapter tensors for ``model``, strictly: every tensor present
    once, with the shape this base needs."""
    out = {}
    for peft_name, ours, shape, factor in _layout(model, spec):
        if peft_name not in tensors:
            raise CheckpointError(f"{where}: tensor {peft_name} is missing from the adapter")
        t = tensors[peft_name]
        if factor == "A" and tuple(t.shape) == (shape[0] * shape[1], shape[2]):
            t = t.reshape(shape)
        elif factor == "B" and tuple(t.shape) == (shape[1], shape[2] * shape[0]):
            t = t.reshape(shape[1], shape[2], shape[0]).permute(2, 0, 1)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{where}: adapter tensor {peft_name} has shape {list(tensors[peft_name].shape)}, "
                                  f"but this base needs {list(shape)} there: the adapter was trained for another "
                                  "base model")
        out[ours] = t
    extra = sorted(set(tensors) - {row[0] for row in _layout(model, spec)})
    if extra:
        raise CheckpointError(f"{where}: adapter tensor {extra[0]} has no place in this base model"
                              f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
    return out


def peft_config(spec: LoraSpec, model: nn.Module, base: str | None) -> dict:
    """adapter_config.json: PEFT's ``LoraConfig`` for this spec on this model."""
    linears, experts = find_targets(model, spec)
    modules = [t for t in spec.expanded() if any(_matches(n, t) for n in linears)]
    params = [t for t in spec.expanded() if t not in modules]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": spec.r,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": modules,
            "target_parameters": params or None, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True}


def base_shape(config: ZayaConfig) -> dict:
    return {k: getattr(config, k) for k in SHAPE_KEYS}


def check_base(raw: dict, config: ZayaConfig, where: Path) -> None:
    """An adapter that records its base's shape must meet a base of that shape."""
    recorded = raw.get("zaya_base_shape")
    if not recorded:
        return
    ours = base_shape(config)
    diff = [f"{k} {recorded[k]} (this base: {ours[k]})" for k in SHAPE_KEYS if k in recorded and recorded[k] != ours[k]]
    if diff:
        raise CheckpointError(f"{where} was trained for another base model: it has {', '.join(diff)}")


def spec_from_peft(raw: dict, where: Path) -> LoraSpec:
    """The spec of an adapter_config.json; a setting zaya does not implement (DoRA, rsLoRA,
    per-layer ranks, extra modules) is an error that names it."""
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type is {raw.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if raw.get(key):
            raise CheckpointError(f"{where}: {key}=true is not supported")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if raw.get(key):
            raise CheckpointError(f"{where}: {key} is set; zaya applies one rank and alpha to every target")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{where}: bias={raw['bias']!r} is not supported (only 'none')")
    modules = raw.get("target_modules") or []
    if isinstance(modules, str):
        raise CheckpointError(f"{where}: target_modules is a regular expression; zaya needs a list of names")
    targets = tuple(modules) + tuple(raw.get("target_parameters") or ())
    try:
        return LoraSpec(int(raw["r"]), float(raw["lora_alpha"]), float(raw.get("lora_dropout") or 0.0), targets)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: r and lora_alpha must be numbers ({exc})") from None


def _base_weight(model: nn.Module, adapter: str) -> torch.Tensor:
    """The frozen weight an adapter tensor belongs to (its dtype and device are the adapter's)."""
    owner_name, _, leaf = adapter.rpartition(".")
    owner = model.get_submodule(owner_name)
    return owner.weight if isinstance(owner, LoraLinear) else getattr(owner, leaf.split("_lora_")[0] + "_proj")


@torch.no_grad()
def assign_adapters(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Put adapter values (zaya's names) into a model that carries the adapter modules, in the
    dtype and on the device of the weights they adapt, frozen (for inference)."""
    for name, value in values.items():
        base = _base_weight(model, name)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(value.to(base.device, base.dtype), requires_grad=False))


def weight_deltas(model: nn.Module, spec: LoraSpec, values: dict[str, torch.Tensor]) -> dict[str, Callable]:
    """Base weight name -> a function giving the fp32 update the adapter adds to it (for merging)."""
    linears, experts = find_targets(model, spec)
    if model.config.tie_word_embeddings and "lm_head" in linears:
        raise CheckpointError("the adapter targets lm_head, which this base ties to the embedding table; merged, "
                              "it would change the embeddings too. Serve it unmerged instead")

    def delta(key: str, stacked: bool):
        a, b = values[f"{key}_A"].float(), values[f"{key}_B"].float()
        return lambda: (torch.bmm(b, a) if stacked else b @ a) * spec.scaling

    out = {f"{n}.weight": delta(f"{n}.lora", False) for n in linears}
    out.update({f"{n}.{s}": delta(f"{n}.{_short(s)}_lora", True) for n, stacks in experts.items() for s in stacks})
    return out
