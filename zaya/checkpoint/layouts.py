"""Checkpoint layouts: the native one and Zyphra's legacy one, translated in one place.

* **native** (``Zyphra/ZAYA1-8B``, transformers' ``save_pretrained``): 40 fused blocks, experts
  stacked ``mlp.experts.gate_up_proj`` (E, 2I, H) / ``down_proj`` (E, H, I).
* **legacy** (``Zyphra/ZAYA1-8B-legacy``, ZAYA1-base): 80 alternating attention / MoE layers,
  ``zaya_block.*``, one ``local_experts.e`` per expert, and a ``res_scale`` at the *entry* of every
  layer that belongs to the sub-block before it. The mapping is Zyphra's
  ``convert_zaya_weights_to_hf.py`` (transformers fork, branch ``zaya1``).

Reading only: zaya writes the native layout (``zaya convert``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from zaya.checkpoint.files import SafetensorsFiles
from zaya.config import ZayaConfig
from zaya.errors import CheckpointError, ConfigError


# ------------------------------------------------------------------------------------- config
def read_config(path: Path) -> tuple[ZayaConfig, str]:
    """Parse config.json; returns the native config and the layout the config declares."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: a ZAYA checkpoint directory needs config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    layout = "legacy" if is_legacy_config(raw) else "native"
    try:
        return ZayaConfig.from_dict(legacy_config_to_native(raw) if layout == "legacy" else raw), layout
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def is_legacy_config(raw: dict) -> bool:
    return "zaya_use_mod" in raw or "ffn_hidden_size" in raw or "zaya_mlp_expansion" in raw


def legacy_config_to_native(raw: dict[str, Any]) -> dict[str, Any]:
    """Config conversion of Zyphra's converter (research note §3.2)."""
    out = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    layers = raw.get("num_hidden_layers", 80)
    if layers % 2:
        raise ConfigError(f"legacy config has an odd num_hidden_layers ({layers}); it must alternate attention/MoE")
    out["num_hidden_layers"] = layers // 2
    if "ffn_hidden_size" in raw:
        out["moe_intermediate_size"] = raw["ffn_hidden_size"] // 2
    if "zaya_mlp_expansion" in raw:
        out["router_hidden_size"] = raw["zaya_mlp_expansion"]
    if "norm_epsilon" in raw:
        out["rms_norm_eps"] = raw["norm_epsilon"]
    if "moe_router_topk" in raw:
        out["num_experts_per_tok"] = raw["moe_router_topk"]
    if "kv_channels" in raw:
        out["head_dim"] = raw["kv_channels"]
    if "num_query_groups" in raw:
        out["num_key_value_heads"] = raw["num_query_groups"]
    swa = raw.get("swa_layers")
    if swa:
        windows = list(swa)[::2]
        out["layer_types"] = ["hybrid_sliding" if w else "hybrid" for w in windows]
        if any(windows):
            out["sliding_window"] = max(windows) + 1  # legacy counts previous tokens only
    factor = raw.get("partial_rotary_factor", 0.5)
    out["rope_parameters"] = {
        "hybrid": {"rope_type": "default", "rope_theta": raw.get("rope_theta", 5_000_000.0),
                   "partial_rotary_factor": factor},
        "hybrid_sliding": {"rope_type": "default", "rope_theta": raw.get("swa_rotary_base") or 10_000.0,
                           "partial_rotary_factor": factor},
    }
    if raw.get("clamp_temp"):
        raise ConfigError("legacy config sets clamp_temp=true, which no published ZAYA1 checkpoint uses and zaya "
                          "does not implement")
    out["model_type"] = "zaya"
    return out


# -------------------------------------------------------------------------------------- names
# legacy module name -> native module name, within one attention / router sub-block
ATTN_NAMES = {"qkv.linear_q": "qkv_proj.q_proj", "qkv.linear_k": "qkv_proj.k_proj",
              "qkv.val_proj1": "qkv_proj.v_proj_current", "qkv.val_proj2": "qkv_proj.v_proj_delayed",
              "qkv.conv_qk.0": "qkv_proj.conv_qk_depthwise", "qkv.conv_qk.1": "qkv_proj.conv_qk_grouped",
              "o_proj": "o_proj"}
ROUTER_NAMES = {"down_proj": "down_proj", "rmsnorm_eda": "router_mlp.norm", "router_mlp.0": "router_mlp.fc1",
                "router_mlp.2": "router_mlp.fc2", "router_mlp.4": "router_mlp.out_proj"}


def legacy_to_native_name(name: str, num_layers: int) -> tuple[str, int | None]:
    """Native name (and expert index for per-expert tensors) of a legacy tensor name."""
    if name in ("model.final_norm.weight",):
        return "model.norm.weight", None
    if name.startswith("model.res_scale."):
        return f"model.layers.{num_layers - 1}.post_mlp_residual_scale.{name.rsplit('.', 1)[1]}", None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        return name, None  # embed_tokens, lm_head
    old, rest = int(m.group(1)), m.group(2)
    k, attn = old // 2, old % 2 == 0
    if rest.startswith("res_scale."):
        leaf = rest.split(".", 1)[1]
        if attn:
            if k == 0:
                return f"model.input_{leaf}" if leaf.startswith("hidden_states") else f"!{name}", None
            return f"model.layers.{k - 1}.post_mlp_residual_scale.{leaf}", None
        return f"model.layers.{k}.post_attention_residual_scale.{leaf}", None
    if rest == "input_norm.weight":
        return f"model.layers.{k}.{'input_layernorm' if attn else 'post_attention_layernorm'}.weight", None
    if attn and rest == "self_attn.qkv.temp":
        return f"model.layers.{k}.self_attn.qk_norm.temp", None
    if attn and rest.startswith("self_attn."):
        module, leaf = rest[len("self_attn."):].rsplit(".", 1)
        if module in ATTN_NAMES:
            return f"model.layers.{k}.self_attn.{ATTN_NAMES[module]}.{leaf}", None
    if not attn and rest.startswith("zaya_block.router."):
        tail = rest[len("zaya_block.router."):]
        if tail in ("router_states_scale", "balancing_biases"):
            return f"model.layers.{k}.mlp.gate.{tail}", None
        module, leaf = tail.rsplit(".", 1)
        if module in ROUTER_NAMES:
            return f"model.layers.{k}.mlp.gate.{ROUTER_NAMES[module]}.{leaf}", None
    e = re.fullmatch(r"zaya_block\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight", rest)
    if not attn and e:
        which = "gate_up_proj" if e.group(2) == "1" else "down_proj"
        return f"model.layers.{k}.mlp.experts.{which}", int(e.group(1))
    return f"!{name}", None  # no native counterpart


def detect_layout(names) -> str:
    for name in names:
        if ".zaya_block." in name or ".res_scale." in name or name.startswith("model.res_scale.") \
                or name == "model.final_norm.weight":
            return "legacy"
    return "native"


def native_tensors(source: SafetensorsFiles, config: ZayaConfig) -> dict[str, Callable[[], torch.Tensor]]:
    """Map native names to loaders; per-expert legacy tensors are stacked on access."""
    layout = detect_layout(source.where)
    if layout == "native":
        return {name: (lambda n=name: source.get(n)) for name in source.where}
    out: dict[str, Callable[[], torch.Tensor]] = {}
    experts: dict[str, dict[int, str]] = {}
    for name in source.where:
        native, expert = legacy_to_native_name(name, config.num_hidden_layers)
        if native.startswith("!"):
            raise CheckpointError(f"unexpected tensor {name} in {source.where[name].name}: no place for it in the "
                                  "legacy ZAYA layout")
        if expert is None:
            if native in out:
                raise CheckpointError(f"tensors map twice onto {native} (second: {name} in {source.where[name].name})")
            out[native] = lambda n=name: source.get(n)
        else:
            experts.setdefault(native, {})[expert] = name
    for native, parts in experts.items():
        want = list(range(config.num_experts))
        if sorted(parts) != want:
            missing = sorted(set(want) - set(parts))
            extra = sorted(set(parts) - set(want))
            raise CheckpointError(f"{native}: legacy experts missing {missing} / unexpected {extra} "
                                  f"(config has num_experts={config.num_experts})")
        out[native] = lambda p=parts: torch.stack([source.get(p[e]) for e in range(len(p))])
    return out
