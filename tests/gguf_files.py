"""ZAYA GGUF files for tests, written with the ``gguf`` package the way llama.cpp PR #23112's
``convert_hf_to_gguf.py`` writes them: the legacy checkpoint's 80-half-layer names (``blk.N.*``,
attention on even blocks, MoE on odd ones), stacked experts, the depthwise conv squeezed, the
vocabulary from gguf-py's ``LlamaHfVocab`` / ``SpecialVocab`` as ``gemma4``. Tensors are
quantized with gguf-py where it can (Q8_0, Q4_0, Q5_0, F16, BF16) and with ``tests.kquants`` (a
port of ggml's reference quantizer) for Q4_K, Q5_K and Q6_K.

The name mapping here follows the converter's rules independently of zaya's reader.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tests import kquants
from tests.legacy_layout import native_to_legacy_state

CCA = {"linear_q": "attn_q", "linear_k": "attn_k", "val_proj1": "cca_val_proj1", "val_proj2": "cca_val_proj2",
       "o_proj": "attn_output", "conv_qk.0": "ssm_conv1d", "conv_qk.1": "cca_conv_grp"}
ROUTER = {"down_proj": "ffn_gate_inp", "rmsnorm_eda": "ffn_norm", "router_mlp.0": "ffn_gate",
          "router_mlp.2": "zaya_router_mlp2", "router_mlp.4": "zaya_router_mlp4"}
RES = {"hidden_states_scale": "res_scale_hs.weight", "hidden_states_bias": "res_scale_hs.bias",
       "residual_scale": "res_scale_res.weight", "residual_bias": "res_scale_res.bias"}
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def gguf_name(legacy: str) -> str:
    """The converter's GGUF name for a legacy checkpoint tensor (experts excluded)."""
    if legacy == "model.embed_tokens.weight":
        return "token_embd.weight"
    if legacy == "model.final_norm.weight":
        return "output_norm.weight"
    if legacy == "lm_head.weight":
        return "output.weight"
    parts = legacy.split(".")
    if parts[1] == "res_scale":
        return RES[parts[2]]
    block, rest = int(parts[2]), ".".join(parts[3:])
    leaf = "bias" if rest.endswith(".bias") else "weight"
    if rest.startswith("res_scale."):
        return f"blk.{block}.{RES[parts[-1]]}"
    if rest == "input_norm.weight":
        return f"blk.{block}.attn_norm.weight"
    if rest == "self_attn.qkv.temp":
        return f"blk.{block}.cca_k_scale.weight"
    if rest.startswith("self_attn."):
        module = rest[len("self_attn."):].removeprefix("qkv.").rsplit(".", 1)[0]
        return f"blk.{block}.{CCA[module]}.{leaf}"
    tail = rest[len("zaya_block.router."):]
    if tail == "balancing_biases":
        return f"blk.{block}.zaya_router_biases.weight"
    if tail == "router_states_scale":
        return f"blk.{block}.zaya_router_eda.weight"
    return f"blk.{block}.{ROUTER[tail.rsplit('.', 1)[0]]}.{leaf}"


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """The float tensors a ZAYA GGUF holds for ``model``, by GGUF name (torch shapes)."""
    config = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    legacy = native_to_legacy_state(state, config)
    out, experts = {}, {}
    for name, t in legacy.items():
        if ".local_experts." in name:
            parts = name.split(".")
            experts.setdefault((int(parts[2]), parts[-2]), {})[int(parts[-3])] = t
            continue
        if name.endswith("conv_qk.0.weight"):
            t = t.squeeze(1)
        out[gguf_name(name)] = t
    for (block, fc), per in experts.items():
        kind = "ffn_gate_up_exps" if fc == "linear_fc1" else "ffn_down_exps"
        out[f"blk.{block}.{kind}.weight"] = torch.stack([per[e] for e in range(len(per))])
    return out


def default_type(name: str, t: torch.Tensor, kind: str) -> str:
    """``kind`` for the matrices llama-quantize quantizes (rows a multiple of the block), F32 else."""
    if t.dim() < 2 or "conv" in name or "ffn_gate_inp" in name or "zaya_router" in name or "ffn_gate." in name:
        return "F32"
    block = 256 if kind in K_QUANTS else 32
    return kind if t.shape[-1] % block == 0 else "F32"


def encode(t: torch.Tensor, kind: str) -> tuple[np.ndarray, object]:
    """(array for GGUFWriter.add_tensor, raw_dtype) of a float tensor stored as ``kind``."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    if kind in ("F32", "F16"):
        return t.float().numpy().astype(np.float32 if kind == "F32" else np.float16), None
    rows = t.reshape(-1, t.shape[-1])
    step = max(1, (1 << 20) // t.shape[-1])  # a million values at a time: bounded temporaries
    parts = [(kquants.quantize if kind in K_QUANTS else _gguf_quantize)(rows[i:i + step].float().numpy(), kind)
             for i in range(0, rows.shape[0], step)]
    return np.concatenate(parts).reshape(*t.shape[:-1], -1), qtype


def _gguf_quantize(x: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    return gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, kind))


def dequantized(tensors: dict[str, tuple[np.ndarray, object]]) -> dict[str, torch.Tensor]:
    """gguf-py's dequantization of what was written (the oracle), by GGUF name."""
    import gguf

    out = {}
    for name, (data, qtype) in tensors.items():
        x = data if qtype is None else gguf.quants.dequantize(data, qtype)
        out[name] = torch.from_numpy(np.asarray(x, dtype=np.float32).copy())
    return out


def write_zaya_gguf(model, path: Path, kind: str = "Q8_0", *, tokenizer_dir: Path | None = None,
                    type_of: Callable[[str, torch.Tensor], str] | None = None, arch: str = "zaya",
                    drop: tuple[str, ...] = (), reference: bool = True) -> dict[str, torch.Tensor]:
    """Write ``model`` as a ZAYA GGUF at ``path``; returns gguf-py's dequantization of every tensor
    (by GGUF name), from which the reference float model is built (nothing with ``reference=False``)."""
    import gguf

    config = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2 * config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.moe_intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["hybrid"]["rope_theta"])
    w.add_rope_dimension_count(config.rotary_dim("hybrid"))
    w.add_expert_count(config.num_experts)
    w.add_expert_used_count(1)
    w.add_expert_feed_forward_length(config.router_hidden_size)
    w.add_ssm_conv_kernel(config.cca_time0)
    w.add_vocab_size(config.vocab_size)
    if tokenizer_dir is not None:
        add_vocab(w, tokenizer_dir)
    written = {}
    for name, t in gguf_tensors(model).items():
        if name in drop:
            continue
        data, qtype = encode(t, (type_of or (lambda n, x: default_type(n, x, kind)))(name, t))
        if reference:
            written[name] = (data, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequantized(written)


def add_vocab(w, tokenizer_dir: Path) -> None:
    """The converter's ``set_vocab``: LlamaHfVocab tokens, ``gemma4``, SpecialVocab with merges."""
    import gguf

    vocab = gguf.LlamaHfVocab(Path(tokenizer_dir))
    tokens, scores, types = zip(*vocab.all_tokens())
    w.add_tokenizer_model("gemma4")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(list(types))
    gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True).add_to_gguf(w)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)


def float_model_from(model, deq: dict[str, torch.Tensor]):
    """A float copy of ``model`` whose tensors are the dequantized file's (the reference model)."""
    ref = copy.deepcopy(model)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    ref.load_state_dict({k: _lookup(k, v, model.config, deq) for k, v in state.items()}, strict=False)
    ref.tie_weights()
    return ref.eval()


def _lookup(native: str, value: torch.Tensor, config, by_tensor: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dequantized file tensor a native tensor came from, in its shape."""
    if native.endswith(("experts.gate_up_proj", "experts.down_proj")):
        block = 2 * int(native.split(".")[2]) + 1
        kind = "ffn_gate_up_exps" if native.endswith("gate_up_proj") else "ffn_down_exps"
        return by_tensor[f"blk.{block}.{kind}.weight"].reshape(value.shape)
    (name,) = native_to_legacy_state({native: value}, config)
    return by_tensor[gguf_name(name)].reshape(value.shape)
