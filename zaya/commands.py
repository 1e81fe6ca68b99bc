"""Core subcommands: generate, chat, convert, info."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from zaya.about import model_about


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="model directory, hub repo id or `zaya list` name (default: the built-in model)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="weight dtype (default: checkpoint's)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization at load time")
    p.add_argument("--max-context", type=int, default=None, help="refuse requests longer than this many tokens")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
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
    import zaya

    return zaya.load(resolve_model_name(args.model), dtype=args.dtype, quantize=args.quantize,
                     max_context=args.max_context)


def resolve_model_name(name):
    """`--model` accepts a path, a hub repo id, or a name from `zaya list`."""
    if name is None or Path(name).expanduser().exists():
        return name
    try:
        from zaya.models_store import find_local
    except ImportError:
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


# ---------------------------------------------------------------------------------------- chat
DIM, RESET = "\033[2m", "\033[0m"


def cmd_chat(args) -> int:
    from zaya.chat import ReasoningParser, generation_starts_in_reasoning, parse_tool_calls

    llm = load_from_args(args)
    if llm.tokenizer is None:
        print("zaya: error: this model has no tokenizer, so it cannot chat", file=sys.stderr)
        return 1
    color = sys.stdout.isatty()
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("Chatting with", llm.path or "the model", "- /reset clears the conversation, /exit quits.", file=sys.stderr)
    about = model_about(llm.path)
    if about:
        print(about, file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit", "/bye"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        text = llm.render_chat(history, enable_thinking=False if args.no_think else None)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        parser = ReasoningParser(generation_starts_in_reasoning(text))
        reasoning, content, in_reasoning = [], [], False
        for ev in llm.stream([ids], **sampling_kwargs(args)):
            r, c = parser.feed(ev.text)
            if ev.finish_reason:
                r2, c2 = parser.flush()
                r, c = r + r2, c + c2
            if r:
                if not in_reasoning:
                    sys.stdout.write((DIM if color else "") + "thinking: ")
                    in_reasoning = True
                sys.stdout.write(r)
                reasoning.append(r)
            if c:
                if in_reasoning:
                    sys.stdout.write((RESET if color else "") + "\n\n")
                    in_reasoning = False
                sys.stdout.write(c)
                content.append(c)
            sys.stdout.flush()
        if in_reasoning and color:
            sys.stdout.write(RESET)
        sys.stdout.write("\n")
        answer, _ = parse_tool_calls("".join(content).strip())
        history.append({"role": "assistant", "content": answer})


# ------------------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    from zaya.checkpoint import convert

    layout = convert(args.src, args.dst)
    print(f"wrote {args.dst} in the native layout (source layout: {layout})")
    return 0


# ---------------------------------------------------------------------------------------- info
def model_report(path) -> dict:
    """Config, parameter counts, KV bytes per token and the per-layer skip-class audit."""
    import torch

    from zaya.checkpoint import TensorSource, detect_layout, legacy_to_native_name, read_config, resolve
    from zaya.model import ZayaForCausalLM

    path = resolve(path)
    config, _ = read_config(path)
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
    source = TensorSource(path)
    layout = detect_layout(source.where)
    audit = []
    for name in sorted(source.where):
        native = legacy_to_native_name(name, config.num_hidden_layers)[0] if layout == "legacy" else name
        if native.endswith("mlp.gate.balancing_biases"):
            b = source.get(name).float()
            margin = float(b[:-1].max() - b[-1])
            audit.append({"layer": int(native.split(".")[2]), "expert_bias_max": float(b[:-1].max()),
                          "skip_bias": float(b[-1]), "skip_reachable": margin < 1.0})
    audit.sort(key=lambda a: a["layer"])
    return {
        "path": str(path), "layout": layout, "config": config.to_dict(),
        "parameters": {"total": total, "embedding": embed, "non_embedding": body,
                       "active_per_token": active_body, "active_with_lm_head": active_body + embed},
        "kv_bytes_per_token": kv_per_token,
        "cca_state_bytes_per_sequence": config.num_hidden_layers * dtype_bytes *
        (config.conv_channels * config.conv_state_len + config.num_key_value_heads * config.head_dim // 2),
        "skip_audit": audit,
    }


def cmd_info(args) -> int:
    report = model_report(resolve_model_name(args.model) or _default_model())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    c, p = report["config"], report["parameters"]
    print(f"model      {report['path']}  ({report['layout']} layout)")
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


def _default_model():
    import zaya

    return zaya.DEFAULT_MODEL


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete one prompt, streaming tokens",
                       description="Generate a completion. The prompt is wrapped in the model's chat template "
                                   "as a user message unless --raw is given.")
    p.add_argument("prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as-is")
    p.add_argument("--no-think", action="store_true", help="ask the chat template to skip reasoning")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (streams tokens, shows reasoning apart)")
    add_model_args(p)
    add_sampling_args(p, max_new_tokens=1024)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-think", action="store_true", help="ask the chat template to skip reasoning")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="rewrite a (legacy) checkpoint in the native layout")
    p.add_argument("src", help="checkpoint directory or hub repo id")
    p.add_argument("dst", help="output directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="config, parameter counts, KV bytes per token, skip-class audit")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
