"""Writing Zyphra's legacy checkpoint layout, for tests only: zaya itself reads that layout
(zaya.checkpoint.layouts) and always writes the native one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from zaya.checkpoint import read_config
from zaya.checkpoint.layouts import ATTN_NAMES, ROUTER_NAMES
from zaya.config import ZayaConfig
from zaya.errors import CheckpointError


def write_legacy(native_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """A legacy-layout copy of a native checkpoint directory; returns its tensors."""
    config, _ = read_config(native_dir)
    state = load_file(str(native_dir / "model.safetensors"))
    legacy = native_to_legacy_state(state, config)
    out.mkdir()
    save_file(legacy, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(native_config_to_legacy(config)))
    return legacy


def native_config_to_legacy(config: ZayaConfig) -> dict[str, Any]:
    """The inverse of zaya.checkpoint.layouts.legacy_config_to_native."""
    d = config.to_dict()
    for k in ("architectures", "model_type", "rope_parameters", "layer_types", "sliding_window"):
        d.pop(k, None)
    d.update(num_hidden_layers=2 * config.num_hidden_layers, ffn_hidden_size=2 * config.moe_intermediate_size,
             zaya_mlp_expansion=config.router_hidden_size, norm_epsilon=config.rms_norm_eps,
             moe_router_topk=1, kv_channels=config.head_dim, num_query_groups=config.num_key_value_heads,
             zaya_use_mod=True, zaya_use_eda=True, residual_in_fp32=True, cca=True,
             rope_theta=config.rope_parameters["hybrid"]["rope_theta"],
             swa_rotary_base=config.rope_parameters["hybrid_sliding"]["rope_theta"])
    if "hybrid_sliding" in config.layer_types:
        w = config.sliding_window - 1
        d["swa_layers"] = [x for t in config.layer_types for x in ((w if t == "hybrid_sliding" else 0), 0)]
    return d


def native_to_legacy_state(state: dict[str, torch.Tensor], config: ZayaConfig) -> dict[str, torch.Tensor]:
    """Split a native state dict into the legacy layout (inverse of the published mapping)."""
    L = config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if name == "model.norm.weight":
            out["model.final_norm.weight"] = t
        elif name.startswith("model.input_hidden_states_"):
            out[f"model.layers.0.res_scale.{name[len('model.input_'):]}"] = t
        elif not m:
            out[name] = t
        else:
            k, rest = int(m.group(1)), m.group(2)
            a, f = f"model.layers.{2 * k}", f"model.layers.{2 * k + 1}"
            if rest == "input_layernorm.weight":
                out[f"{a}.input_norm.weight"] = t
            elif rest == "post_attention_layernorm.weight":
                out[f"{f}.input_norm.weight"] = t
            elif rest.startswith("post_attention_residual_scale."):
                out[f"{f}.res_scale.{rest.rsplit('.', 1)[1]}"] = t
            elif rest.startswith("post_mlp_residual_scale."):
                leaf = rest.rsplit(".", 1)[1]
                out[f"model.layers.{2 * k + 2}.res_scale.{leaf}" if k < L - 1 else f"model.res_scale.{leaf}"] = t
            elif rest == "self_attn.qk_norm.temp":
                out[f"{a}.self_attn.qkv.temp"] = t
            elif rest.startswith("self_attn."):
                module, leaf = rest[len("self_attn."):].rsplit(".", 1)
                inv = {v: k2 for k2, v in ATTN_NAMES.items()}
                out[f"{a}.self_attn.{inv[module]}.{leaf}"] = t
            elif rest.startswith("mlp.gate."):
                tail = rest[len("mlp.gate."):]
                if tail in ("router_states_scale", "balancing_biases"):
                    out[f"{f}.zaya_block.router.{tail}"] = t
                else:
                    module, leaf = tail.rsplit(".", 1)
                    inv = {v: k2 for k2, v in ROUTER_NAMES.items()}
                    out[f"{f}.zaya_block.router.{inv[module]}.{leaf}"] = t
            elif rest.startswith("mlp.experts."):
                fc = "linear_fc1" if rest.endswith("gate_up_proj") else "linear_fc2"
                for e in range(t.shape[0]):
                    out[f"{f}.zaya_block.experts.local_experts.{e}.{fc}.weight"] = t[e]
            else:
                raise CheckpointError(f"no legacy name for {name}")
    return out
