"""GGUF tensor names and metadata of ZAYA files -> zaya's native names and config.

The published ZAYA GGUF files (``Abiray/ZAYA1-8B-GGUF``, ``JusteLeo/ZAYA1-8B-GGUF``) were written
by the ``convert_hf_to_gguf.py`` of llama.cpp pull request #23112 (branch ``Juste-Leo2/llama.cpp``
``Zaya1``; architecture ``zaya``) from Zyphra's original checkpoint, so they keep its layout:
``block_count`` 80 half-layers, attention on even blocks and MoE on odd ones, one ``res_scale`` at
the entry of every half-layer. Each GGUF name therefore corresponds to a legacy safetensors name
(``zaya.checkpoint.layouts``), which ``legacy_to_native_name`` places in the native model; the
stacked experts map directly.

A second, later ZAYA converter (40 fused blocks with ``attn_post_norm`` / ``res_scale_*_mlp``
tensors; the ``1bit-MONSTER`` files) is recognised and refused with a message saying so.
"""

from __future__ import annotations

import re
from typing import Any

from zaya.checkpoint.layouts import legacy_to_native_name
from zaya.errors import CheckpointError

# GGUF suffix (after "blk.N.") -> legacy suffix (after "model.layers.N."), per half-layer kind
ATTENTION = {
    "attn_norm.weight": "input_norm.weight",
    "attn_q.weight": "self_attn.qkv.linear_q.weight",
    "attn_k.weight": "self_attn.qkv.linear_k.weight",
    "cca_val_proj1.weight": "self_attn.qkv.val_proj1.weight",
    "cca_val_proj2.weight": "self_attn.qkv.val_proj2.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ssm_conv1d.weight": "self_attn.qkv.conv_qk.0.weight",
    "ssm_conv1d.bias": "self_attn.qkv.conv_qk.0.bias",
    "cca_conv_grp.weight": "self_attn.qkv.conv_qk.1.weight",
    "cca_conv_grp.bias": "self_attn.qkv.conv_qk.1.bias",
    "cca_k_scale.weight": "self_attn.qkv.temp",
}
MOE = {
    "attn_norm.weight": "input_norm.weight",
    "ffn_gate_inp.weight": "zaya_block.router.down_proj.weight",
    "ffn_gate_inp.bias": "zaya_block.router.down_proj.bias",
    "ffn_norm.weight": "zaya_block.router.rmsnorm_eda.weight",
    "ffn_gate.weight": "zaya_block.router.router_mlp.0.weight",
    "ffn_gate.bias": "zaya_block.router.router_mlp.0.bias",
    "zaya_router_mlp2.weight": "zaya_block.router.router_mlp.2.weight",
    "zaya_router_mlp2.bias": "zaya_block.router.router_mlp.2.bias",
    "zaya_router_mlp4.weight": "zaya_block.router.router_mlp.4.weight",
    "zaya_router_biases.weight": "zaya_block.router.balancing_biases",
    "zaya_router_eda.weight": "zaya_block.router.router_states_scale",
}
EXPERTS = {"ffn_gate_up_exps.weight": "gate_up_proj", "ffn_down_exps.weight": "down_proj"}
RES_SCALE = {"res_scale_hs.weight": "hidden_states_scale", "res_scale_hs.bias": "hidden_states_bias",
             "res_scale_res.weight": "residual_scale", "res_scale_res.bias": "residual_bias"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.final_norm.weight",
       "output.weight": "lm_head.weight", **{k: f"model.res_scale.{v}" for k, v in RES_SCALE.items()}}
# the depthwise conv is stored squeezed: [C, kernel] for the model's [C, 1, kernel]
UNSQUEEZE_1 = ("ssm_conv1d.weight",)
OTHER_CONVERTER = ("attn_post_norm.weight", "res_scale_hs_mlp.weight", "attn_norm_2.weight")


def native_name(name: str, half_layers: int) -> str:
    """The native name of GGUF tensor ``name``; raises CheckpointError for a name with no place."""
    if name in TOP:
        return legacy_to_native_name(TOP[name], half_layers // 2)[0]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m is None:
        raise CheckpointError(f"unexpected tensor {name}: no place for it in a ZAYA model")
    i, suffix = int(m.group(1)), m.group(2)
    if suffix.startswith(OTHER_CONVERTER):
        raise CheckpointError(f"tensor {name} comes from a ZAYA converter with 40 fused blocks, which zaya does not "
                              "read; zaya reads the files of llama.cpp PR #23112's converter (80 half-layers)")
    if i >= half_layers:
        raise CheckpointError(f"unexpected tensor {name}: the file has block_count {half_layers}")
    if suffix in EXPERTS and i % 2:
        return f"model.layers.{i // 2}.mlp.experts.{EXPERTS[suffix]}"
    table = MOE if i % 2 else ATTENTION
    legacy = table.get(suffix) or (f"res_scale.{RES_SCALE[suffix]}" if suffix in RES_SCALE else None)
    if legacy is None:
        kind = "MoE" if i % 2 else "attention"
        raise CheckpointError(f"unexpected tensor {name}: no place for it in a ZAYA {kind} half-layer")
    native, _ = legacy_to_native_name(f"model.layers.{i}.{legacy}", half_layers // 2)
    if native.startswith("!"):
        raise CheckpointError(f"unexpected tensor {name}: no place for it in a ZAYA model")
    return native


def expected_names(half_layers: int, tied: bool) -> list[str]:
    """Every tensor the converter writes for a ZAYA model (biases of the linears included)."""
    names = ["token_embd.weight", "output_norm.weight", *[k for k in TOP if k.startswith("res_scale")]]
    names += [] if tied else ["output.weight"]
    for i in range(half_layers):
        table = dict(MOE, **EXPERTS) if i % 2 else ATTENTION
        skip = {"zaya_router_eda.weight"} if i == 1 else set()  # the first MoE layer carries no router state
        names += [f"blk.{i}.{s}" for s in table if s not in skip]
        names += [f"blk.{i}.{s}" for s in RES_SCALE if i or s.startswith("res_scale_hs")]
    return names


def _field(fields: dict[str, Any], key: str, default=None):
    f = fields.get(key)
    if f is None:
        return default
    return f.contents()


def config_dict(fields: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, Any]:
    """A native config.json dict from a ZAYA GGUF's metadata (``fields``) and tensor shapes
    (torch order); ``where`` names the file in errors."""
    def need(key: str):
        value = _field(fields, f"zaya.{key}")
        if value is None:
            raise CheckpointError(f"{where}: metadata key zaya.{key} is missing")
        return value

    half_layers = int(need("block_count"))
    if half_layers % 2:
        raise CheckpointError(f"{where}: zaya.block_count is {half_layers}; ZAYA GGUF files alternate attention "
                              "and MoE half-layers, so it must be even")
    heads, kv_heads = int(need("attention.head_count")), int(need("attention.head_count_kv"))
    if "blk.0.attn_q.weight" not in shapes or "token_embd.weight" not in shapes:
        missing = "blk.0.attn_q.weight" if "token_embd.weight" in shapes else "token_embd.weight"
        raise CheckpointError(f"tensor {missing} is missing from {where}")
    head_dim = int(_field(fields, "zaya.attention.key_length", shapes["blk.0.attn_q.weight"][0] // heads))
    grp = shapes.get("blk.0.cca_conv_grp.weight")
    rope_dims = _field(fields, "zaya.rope.dimension_count")
    eos = _field(fields, "tokenizer.ggml.eos_token_id")
    return {
        "model_type": "zaya", "dtype": "bfloat16",
        "vocab_size": shapes["token_embd.weight"][0], "hidden_size": int(need("embedding_length")),
        "num_hidden_layers": half_layers // 2, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "moe_intermediate_size": int(need("feed_forward_length")),
        "num_experts": int(need("expert_count")), "num_experts_per_tok": int(_field(fields, "zaya.expert_used_count", 1)),
        "router_hidden_size": int(need("expert_feed_forward_length")),
        "rms_norm_eps": float(_field(fields, "zaya.attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(_field(fields, "zaya.context_length", 131072)),
        "cca_time0": int(_field(fields, "zaya.ssm.conv_kernel", 2)), "cca_time1": int(grp[-1]) if grp else 2,
        "rope_parameters": {"hybrid": {"rope_theta": float(_field(fields, "zaya.rope.freq_base", 5_000_000.0)),
                                       "partial_rotary_factor": int(rope_dims) / head_dim if rope_dims else 0.5}},
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": _field(fields, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": int(eos) if eos is not None else None,
        "pad_token_id": _field(fields, "tokenizer.ggml.padding_token_id"),
    }
