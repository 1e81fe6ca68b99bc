"""The llama.cpp half of benchmarks/compare_llamacpp.py, run by the interpreter that has
llama-cpp-python, gguf and numpy (and no torch or zaya):

    python llamacpp_side.py version
    python llamacpp_side.py build --spec '{"vocab_size": ...}' --dir DIR --types F16,BF16,Q8_0,Q4_K_M,Q4_0
    python llamacpp_side.py run FILE.gguf --threads 2 --workloads '{"decode_b1": ["decode", 1, 32]}'

Each command prints one JSON object on its last line.

The stand-in is a Mixtral-style ``llama``-architecture GGUF (llama.cpp's port of ZAYA1 was never
merged): ZAYA1's hidden size, layer count and vocabulary, 8 query / 2 KV heads of 128 (the widths
of its compressed attention), ``num_experts`` experts of its FFN width and one expert per token,
so a decode token reads about the bytes zaya's model of that shape reads. Weights are random,
N(0, 0.02) like the zaya checkpoint, written with the ``gguf`` package in F16 and BF16; the
quantized files come from llama.cpp's own quantizer (``llama_model_quantize``) run on the F16
file, with its standard per-tensor choices (Q4_K_M keeps some attn_v / ffn_down rows in Q6_K; the
tied embedding / head is Q6_K in the 4-bit presets, Q8_0 in Q8_0) or, for the "-h4" kinds, with
the head in the preset's 4-bit type. The vocabulary is a minimal
SentencePiece-style one (control tokens, 256 byte tokens, filler pieces) so that llama.cpp loads
the file; timings feed token ids directly.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

FLOAT_TYPES = ("F16", "BF16")
# kind -> (llama.cpp preset, type of the tied embedding / head or None for the preset's choice).
# The 4-bit presets keep the head in Q6_K; the "-h4" kinds put it in the body's 4-bit type, as
# zaya int4 does, so that the bytes per token match where the head dominates (real4).
FTYPES = {"Q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", None), "Q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", None),
          "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", None), "Q4_0-h4": ("LLAMA_FTYPE_MOSTLY_Q4_0", "GGML_TYPE_Q4_0"),
          "Q4_K_M-h4": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "GGML_TYPE_Q4_K")}
INIT_STD = 0.02
N_BATCH = 512


# ------------------------------------------------------------------------------------- writing
def tensor_shapes(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor, in file order; 1-D tensors are the RMSNorm weights."""
    H, V, F, E = spec["hidden_size"], spec["vocab_size"], spec["moe_intermediate_size"], spec["num_experts"]
    q, kv = spec["num_attention_heads"] * spec["head_dim"], spec["num_key_value_heads"] * spec["head_dim"]
    out = [("token_embd.weight", (V, H))]
    for i in range(spec["num_hidden_layers"]):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (H,)), (b + "attn_q.weight", (q, H)), (b + "attn_k.weight", (kv, H)),
                (b + "attn_v.weight", (kv, H)), (b + "attn_output.weight", (H, q)), (b + "ffn_norm.weight", (H,)),
                (b + "ffn_gate_inp.weight", (E, H)), (b + "ffn_gate_exps.weight", (E, F, H)),
                (b + "ffn_up_exps.weight", (E, F, H)), (b + "ffn_down_exps.weight", (E, H, F))]
    return out + [("output_norm.weight", (H,))]  # no output.weight: the head is tied to token_embd


def vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    import gguf

    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    if size < len(tokens):
        raise ValueError(f"vocab_size {size} is smaller than the {len(tokens)} tokens every vocabulary needs")
    tokens += [f"\u2581t{i}" for i in range(size - len(tokens))]
    types += [T.NORMAL] * (size - len(types))
    return tokens, [-float(i) for i in range(size)], [int(t) for t in types]


def _values(shape, seed: int, index: int, kind: str) -> np.ndarray:
    """One tensor's data: ones for norms, else N(0, INIT_STD) drawn from a per-tensor seed (so the
    F16 and BF16 files hold the same draws), generated in chunks to bound memory."""
    import gguf

    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)
    rows = int(np.prod(shape[:-1]))
    rng = np.random.default_rng([seed, index])
    if kind == "F16":
        out = np.empty((rows, shape[-1]), dtype=np.float16)
    else:
        out = np.empty((rows, 2 * shape[-1]), dtype=np.uint8)  # BF16 as the gguf package lays out its bytes
    step = max(1, (1 << 24) // shape[-1])
    for start in range(0, rows, step):
        chunk = rng.standard_normal((min(step, rows - start), shape[-1]), dtype=np.float32) * INIT_STD
        out[start:start + len(chunk)] = chunk if kind == "F16" else gguf.quants.quantize(chunk, gguf.GGMLQuantizationType.BF16)
    return out.reshape(*shape[:-1], -1)


def write_float(spec: dict, path: Path, kind: str, seed: int = 0) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"zaya stand-in {spec['hidden_size']}x{spec['num_hidden_layers']}")
    w.add_context_length(spec.get("max_position_embeddings", 4096))
    w.add_embedding_length(spec["hidden_size"])
    w.add_block_count(spec["num_hidden_layers"])
    w.add_feed_forward_length(spec["moe_intermediate_size"])
    w.add_head_count(spec["num_attention_heads"])
    w.add_head_count_kv(spec["num_key_value_heads"])
    w.add_key_length(spec["head_dim"])
    w.add_value_length(spec["head_dim"])
    w.add_rope_dimension_count(spec["head_dim"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(spec["num_experts"])
    w.add_expert_used_count(1)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "F16" else gguf.LlamaFileType.MOSTLY_BF16)
    tokens, scores, types = vocabulary(spec["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    shapes = tensor_shapes(spec)
    for name, shape in shapes:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.float32, 4 * shape[0])
        elif kind == "F16":
            w.add_tensor_info(name, shape, np.float16, 2 * int(np.prod(shape)))
        else:
            byte_shape = (*shape[:-1], 2 * shape[-1])
            w.add_tensor_info(name, byte_shape, np.uint8, int(np.prod(byte_shape)), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for index, (name, shape) in enumerate(shapes):
        w.write_tensor_data(_values(shape, seed, index, kind))
    w.close()


def quantize(src: Path, dst: Path, kind: str, threads: int) -> None:
    import llama_cpp as L

    preset, head = FTYPES[kind]
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, preset)
    if head:
        params.output_tensor_type = getattr(L, head)
    params.nthread = threads
    if L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} ({kind}) failed")


def build(spec: dict, root: Path, kinds: list[str], threads: int) -> dict[str, str]:
    """The stand-in in every requested type, each file written once (to a temporary name first,
    so an interrupted build is not reused)."""
    root.mkdir(parents=True, exist_ok=True)
    files = {k: root / f"stand-in-{k}.gguf" for k in ("F16", *kinds)}
    for kind in ("F16", *[k for k in kinds if k != "F16"]):
        path = files[kind]
        if path.is_file():
            continue
        tmp = path.with_suffix(".tmp")
        print(f"writing {path} ...", file=sys.stderr)
        if kind in FLOAT_TYPES:
            write_float(spec, tmp, kind)
        elif kind in FTYPES:
            quantize(files["F16"], tmp, kind, threads)
        else:
            raise ValueError(f"unknown GGUF type {kind!r}; use {', '.join((*FLOAT_TYPES, *FTYPES))}")
        os.replace(tmp, path)
    return {k: str(files[k]) for k in kinds}


def bytes_per_token(path: Path) -> dict:
    """Bytes of weights a batch-1 decode step reads: the chosen expert of each layer, everything
    else but the embedding table (a tied head is counted once, as the head), plus the types used."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    n_expert = int(_field(reader, "llama.expert_count"))
    used = int(_field(reader, "llama.expert_used_count"))
    names = {t.name for t in reader.tensors}
    total, types = 0, {}
    for t in reader.tensors:
        nbytes = int(t.n_bytes)
        if "_exps." in t.name:
            nbytes = nbytes * used // n_expert
        elif t.name == "token_embd.weight" and "output.weight" in names:
            nbytes = 0
        total += nbytes
        kind = t.tensor_type.name
        types[kind] = types.get(kind, 0) + nbytes
    return {"bytes_per_token": total, "bytes_by_type": types, "file_bytes": path.stat().st_size}


def cached_bytes_per_token(path: Path) -> dict:
    """`bytes_per_token`, kept beside the file: reading a 262k-token vocabulary back takes minutes."""
    side = path.with_suffix(".bytes.json")
    if side.is_file() and side.stat().st_mtime >= path.stat().st_mtime:
        return json.loads(side.read_text())
    out = bytes_per_token(path)
    side.write_text(json.dumps(out))
    return out


def _field(reader, key):
    field = reader.get_field(key)
    return field.parts[field.data[0]][0]


# -------------------------------------------------------------------------------------- timing
class Runner:
    """One llama.cpp context over a GGUF file, fed token ids, greedy (argmax of the last logits)."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, N_BATCH, N_BATCH
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def eval(self, ids: list[int]) -> int:
        """Append ``ids`` to the sequence (in batches of N_BATCH) and return the greedy next token."""
        L = self.L
        for start in range(0, len(ids), N_BATCH):
            chunk = ids[start:start + N_BATCH]
            tokens = (L.llama_token * len(chunk))(*chunk)  # the batch only points at it: keep it alive
            rc = L.llama_decode(self.ctx, L.llama_batch_get_one(tokens, len(chunk)))
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab,))
        return int(logits.argmax())

    def reset(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def prompt(self, length: int, seed: int) -> list[int]:
        return np.random.default_rng(seed).integers(3, self.vocab, length).tolist()

    def decode(self, prompt_len: int, new_tokens: int, seed: int) -> float:
        """tok/s over ``new_tokens - 1`` timed steps after the first, as zaya's runner counts them."""
        self.reset()
        token = self.eval(self.prompt(prompt_len, seed))
        token = self.eval([token])
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = self.eval([token])
        return max(1, new_tokens - 1) / (time.perf_counter() - start)

    def prefill(self, tokens: int, seed: int) -> float:
        self.reset()
        ids = self.prompt(tokens, seed)
        start = time.perf_counter()
        self.eval(ids)
        return tokens / (time.perf_counter() - start)

    def close(self) -> None:
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def run(path: Path, workloads: dict, new_tokens: int, threads: int, seed: int) -> dict:
    n_ctx = max(n + new_tokens + 8 for _, _, n in workloads.values())
    runner = Runner(path, threads, max(n_ctx, 256))
    runner.decode(8, 2, 99)  # warm-up: first-call allocations, weight repacking
    runner.prefill(64, 99)
    out = {}
    for name, (kind, size, prompt_len) in workloads.items():
        if kind == "prefill":
            out[name] = runner.prefill(size, seed)
        elif size == 1:
            out[name] = runner.decode(prompt_len, new_tokens, seed)
        else:
            raise ValueError(f"{name}: only batch-1 decode is timed on llama.cpp")
    runner.close()
    return out


def version() -> dict:
    import gguf  # noqa: F401  (checked here so a missing package is reported before any build)
    import llama_cpp as L

    from importlib.metadata import version as dist_version

    info = L.llama_print_system_info().decode()
    return {"llama_cpp_python": L.__version__, "gguf": dist_version("gguf"), "numpy": np.__version__,
            "system_info": info}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version")
    b = sub.add_parser("build")
    b.add_argument("--spec", required=True, help="the shape as JSON (the keys of benchmarks/common.py SHAPES)")
    b.add_argument("--dir", type=Path, required=True)
    b.add_argument("--types", default="F16,BF16,Q8_0,Q4_K_M,Q4_0")
    b.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("run")
    r.add_argument("file", type=Path)
    r.add_argument("--workloads", required=True, help="JSON: name -> [kind, batch or tokens, prompt length]")
    r.add_argument("--new-tokens", type=int, default=32)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "version":
        out = version()
    elif args.cmd == "build":
        files = build(json.loads(args.spec), args.dir, args.types.split(","), args.threads)
        out = {k: {"path": p, **cached_bytes_per_token(Path(p))} for k, p in files.items()}
    else:
        out = run(args.file, json.loads(args.workloads), args.new_tokens, args.threads, args.seed)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
