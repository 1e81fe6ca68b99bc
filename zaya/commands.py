"""Core subcommands: generate, convert, quantize, export, info (`zaya chat` is zaya.repl)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from zaya.checkpoint import convert, merge_adapter, open_checkpoint, resolve, save_quantized
from zaya.engine import compiled
from zaya.errors import ZayaError
from zaya.llm import DEFAULT_MODEL, load, parse_dtype
from zaya.model import ZayaForCausalLM
from zaya.models_store import find_local
from zaya.quant import QuantSpec
from zaya.sampling import DEFAULT_MAX_NEW_TOKENS


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="model directory, hub repo id or `zaya list` name (default: the built-in model)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="weight dtype (default: checkpoint's)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization at load time")
    p.add_argument("--max-context", type=int, default=None, help="refuse requests longer than this many tokens")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter (PEFT format, e.g. a zaya train checkpoint) applied unmerged")
    p.add_argument("--cache-memory", default=None, metavar="SIZE",
                   help="KV cache budget, bytes or a size such as 4GiB or 512MB (default: a quarter of the free "
                        "memory, at most what 32 full-context sequences need; printed at start by serve)")
    p.add_argument("--no-prefix-cache", dest="prefix_caching", action="store_false",
                   help="do not reuse cached prompt prefixes across requests")
    p.add_argument("--compile", choices=compiled.MODES, default=None, help=compiled.MODES_HELP)


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
    """Sampling flags; an unset --max-new-tokens runs up to the context's end, at most ``max_new_tokens``."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: what the context leaves after the prompt, at most {max_new_tokens}")
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy (default 1.0)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_kwargs(args) -> dict:
    names = ["max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "stop"]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def load_from_args(args):
    return load(resolve_model_name(args.model), dtype=args.dtype, quantize=args.quantize,
                max_context=args.max_context, adapter=args.adapter, cache_memory=args.cache_memory,
                prefix_caching=args.prefix_caching, compile=args.compile)


def resolve_model_name(name):
    """`--model` accepts a path, a hub repo id, or a name from `zaya list`."""
    if name is None or Path(name).expanduser().exists():
        return name
    return find_local(name) or name


# ------------------------------------------------------------------------------------ generate
def cmd_generate(args) -> int:
    llm = load_from_args(args)
    kwargs = sampling_kwargs(args)
    if args.raw or llm.tokenizer is None:
        prompt = args.prompt
    else:
        messages = [{"role": "user", "content": args.prompt}]
        prompt = llm.apply_chat_template(messages, enable_thinking=False if args.no_think else None)
    kwargs.update(constraint_kwargs(args))
    start, tokens, reason = time.perf_counter(), 0, None
    for ev in llm.stream([prompt], n=1, **kwargs):
        tokens += ev.token_id is not None
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        reason = ev.finish_reason or reason
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{tokens} tokens in {elapsed:.2f}s, {tokens / max(elapsed, 1e-9):.1f} tok/s, finish: {reason}]",
          file=sys.stderr)
    return 0


def add_constraint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (after </think>; the reasoning stays free)")
    g.add_argument("--json", action="store_true", help="answer with a JSON object")
    g.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="answer with JSON valid under this schema (inline JSON or a file path)")
    g.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                   help="reasoning tokens before </think> is forced")


def constraint_kwargs(args) -> dict:
    """``json_schema`` / ``thinking_budget`` for `LLM.generate` from the flags above."""
    out = {}
    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith(("{", "true", "false")):
            path = Path(text).expanduser()
            if not path.is_file():
                raise ZayaError(f"--json-schema: {text!r} is neither inline JSON nor a file")
            text = path.read_text()
        try:
            out["json_schema"] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ZayaError(f"--json-schema is not valid JSON: {exc}") from None
    elif args.json:
        out["json_schema"] = {"type": "object"}
    if args.thinking_budget is not None:
        out["thinking_budget"] = args.thinking_budget
    return out


# ------------------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    layout = convert(args.src, args.dst)
    print(f"wrote {args.dst} in the native layout (source layout: {layout})")
    return 0


# -------------------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    out = merge_adapter(resolve(resolve_model_name(args.src)), resolve(args.merge_lora), Path(args.dst))
    print(f"wrote {out}: {args.src} with the adapter {args.merge_lora} merged into its weights")
    return 0


# ------------------------------------------------------------------------------------ quantize
def cmd_quantize(args) -> int:
    spec = QuantSpec(args.bits, args.group_size)
    QuantSpec.parse(spec.to_config() | {"group_size": args.group_size})  # validate
    info = save_quantized(args.src, args.dst, spec, parse_dtype(args.dtype))
    label = f"int{spec.bits}" + (f", group size {spec.group_size}" if spec.bits == 4 else "")
    print(f"wrote {args.dst}: {label}, {info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB")
    return 0


# ---------------------------------------------------------------------------------------- info
def model_report(path) -> dict:
    """Config, parameter counts, KV bytes per token and the per-layer skip-class audit."""
    ckpt = open_checkpoint(resolve(path))
    config = ckpt.config
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    embed = model.model.embed_tokens.weight.numel()
    per_expert = model.model.layers[0].mlp.experts.gate_up_proj[0].numel() + \
        model.model.layers[0].mlp.experts.down_proj[0].numel()
    body = total - embed - (0 if config.tie_word_embeddings else model.lm_head.weight.numel())
    active_body = body - config.num_hidden_layers * (config.num_experts - 1) * per_expert
    dtype_bytes = torch.finfo(getattr(torch, config.dtype)).bits // 8
    kv_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    audit = []
    for native, tensor in ckpt.tensors.items():
        if native.endswith("mlp.gate.balancing_biases"):
            b = tensor().float()
            margin = float(b[:-1].max() - b[-1])
            audit.append({"layer": int(native.split(".")[2]), "expert_bias_max": float(b[:-1].max()),
                          "skip_bias": float(b[-1]), "skip_reachable": margin < 1.0})
    audit.sort(key=lambda a: a["layer"])
    files = [ckpt.path] if ckpt.path.is_file() else sorted(ckpt.path.glob("*.safetensors"))
    return {
        "path": str(ckpt.path), "layout": ckpt.layout, "config": config.to_dict(),
        "format": str(ckpt.stored) if ckpt.stored is not None else f"safetensors, {config.dtype}",
        "quantization": ckpt.stored.to_config() if ckpt.stored is not None else None,
        "file_bytes": sum(f.stat().st_size for f in files),
        "parameters": {"total": total, "embedding": embed, "non_embedding": body,
                       "active_per_token": active_body, "active_with_lm_head": active_body + embed},
        "kv_bytes_per_token": kv_per_token,
        "cca_state_bytes_per_sequence": config.num_hidden_layers * dtype_bytes *
        (config.conv_channels * config.conv_state_len + config.num_key_value_heads * config.head_dim // 2),
        "skip_audit": audit,
    }


def cmd_info(args) -> int:
    report = model_report(resolve_model_name(args.model) or DEFAULT_MODEL)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    c, p = report["config"], report["parameters"]
    print(f"model      {report['path']}  ({report['layout']} layout)")
    print(f"format     {report['format']}, {report['file_bytes'] / 1e9:.2f} GB on disk")
    print(f"shape      {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, vocab {c['vocab_size']}, "
          f"{c['num_attention_heads']} q heads / {c['num_key_value_heads']} kv heads x {c['head_dim']}, "
          f"{c['num_experts']} experts x {c['moe_intermediate_size']} (+ skip), router {c['router_hidden_size']}")
    print(f"cca        kernels {c['cca_time0']}/{c['cca_time1']}, layer types "
          f"{sorted(set(c['layer_types']))}, sliding window {c['sliding_window']}")
    print(f"params     total {p['total']:,}  embedding {p['embedding']:,}  non-embedding {p['non_embedding']:,}")
    print(f"active     {p['active_per_token']:,} per token ({p['active_with_lm_head']:,} with the LM head)")
    print(f"kv cache   {report['kv_bytes_per_token']:,} bytes per token, CCA state "
          f"{report['cca_state_bytes_per_sequence']:,} bytes per sequence ({c['dtype']})")
    reachable = [a["layer"] for a in report["skip_audit"] if a["skip_reachable"]]
    print(f"skip class {'reachable in layers ' + str(reachable) if reachable else 'unreachable in every layer'} "
          f"(reachable when max expert bias - skip bias < 1; a skip token gets a zero MoE output)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete one prompt, streaming tokens",
                       description="Generate a completion. The prompt is wrapped in the model's chat template "
                                   "as a user message unless --raw is given.")
    p.add_argument("prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as-is")
    p.add_argument("--no-think", action="store_true", help="ask the chat template to skip reasoning")
    add_constraint_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="rewrite a (legacy) checkpoint in the native layout")
    p.add_argument("src", help="checkpoint directory or hub repo id")
    p.add_argument("dst", help="output directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a plain checkpoint with a LoRA adapter merged into the base",
                       description="Fold a LoRA adapter (PEFT format, e.g. a zaya train checkpoint) into the base "
                                   "weights, one safetensors file at a time; the output loads like any checkpoint.")
    p.add_argument("src", help="the base checkpoint: a directory, hub repo id or `zaya list` name")
    p.add_argument("dst", help="output directory")
    p.add_argument("--merge-lora", required=True, metavar="ADAPTER", help="the adapter directory (or hub repo id)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="write a weight-only int8/int4 copy of a checkpoint",
                       description="Quantize attention projections, experts and the embedding/LM head; the "
                                   "router, convs, norms and scales stay in floating point. The output loads "
                                   "directly with `zaya.load` / --model.")
    p.add_argument("src", help="float checkpoint directory or hub repo id")
    p.add_argument("dst", help="output directory")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8)
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (32, 64, 128 or 256 for the "
                                                              "CPU kernel; others use the portable path)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of the float tensors and scales (default: the checkpoint's)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("info", help="config, parameter counts, KV bytes per token, skip-class audit")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
