"""The downloadable formats against zaya's own int8 / int4: size, memory, decode speed, quality.

    python benchmarks/formats.py --shape mini      # 8 layers, hidden 1024 (files ~0.3-0.9 GB)
    python benchmarks/formats.py --shape real4     # ZAYA1-8B's layer shape, 4 layers, full vocab

One random bf16 model per shape is written under --dir as: zaya int8 and int4 (``zaya quantize``),
GGUF Q8_0 and Q4_K in llama.cpp PR #23112's layout (``tests.gguf_files``), and Zyphra-style
compressed-tensors FP8 and MXFP4 experts (``tests.ct_files``). Files are built once and reused.

* **load**: each file is loaded in a fresh subprocess; peak RSS above the process's RSS before
  loading, over the file's size (the target is <= 1.2), the resident size after loading, and the
  bytes of the layouts kept compressed (``kept_layout_bytes``, zaya.formats' modules only);
* **decode**: batch 1, greedy, ``--tokens`` new tokens after a 32-token prompt; each pair (8-bit
  formats against int8, 4-bit ones against int4) is loaded together and timed alternately for
  ``--rounds`` rounds; medians and the ratio to the zaya reference (the target is >= 1.0);
* **quality** (mini only unless --quality): top-1 agreement and mean KL divergence of each format's
  next-token distribution from the bf16 model's, over 4 prompts of 64 tokens.

``--phases`` runs a subset (``load,decode,quality``). The machine's load average is printed with
every phase; then the README's "which file" table (markdown), and last one JSON object.
``--table REPORT.json`` prints the table of a saved report (its last line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_transformers import SHAPES  # noqa: E402  (the same mini and real4 shapes)

PAIRS = [("int8", "gguf-Q8_0"), ("int8", "ct-fp8"), ("int4", "gguf-Q4_K"), ("int4", "ct-mxfp4")]


def load_avg() -> str:
    return "load %.1f %.1f %.1f" % os.getloadavg()


def random_model(shape: str):
    from zaya.config import ZayaConfig
    from zaya.model import ZayaForCausalLM

    torch.manual_seed(0)
    model = ZayaForCausalLM(ZayaConfig.from_dict(dict(SHAPES[shape], max_position_embeddings=4096)))
    model.init_weights(seed=0)
    with torch.no_grad():  # trained-like spread: router logits differ, experts are all used
        for layer in model.model.layers:
            layer.mlp.gate.balancing_biases[:-1].normal_(0, 0.05)
    return model.to(torch.bfloat16).eval()


def build(shape: str, root: Path) -> dict[str, Path]:
    from tests import kquants
    from tests.ct_files import write_ct_checkpoint
    from tests.gguf_files import write_zaya_gguf
    from zaya.checkpoint import save, save_quantized, state_for_saving
    from zaya.quant import QuantSpec

    base = root / shape
    paths = {"bf16": base, "int8": root / f"{shape}-int8", "int4": root / f"{shape}-int4",
             "gguf-Q8_0": root / f"{shape}-Q8_0.gguf", "gguf-Q4_K": root / f"{shape}-Q4_K.gguf",
             "ct-fp8": root / f"{shape}-fp8", "ct-mxfp4": root / f"{shape}-mxfp4"}
    if all((p / "config.json").is_file() or p.is_file() for p in paths.values()):
        return paths
    print(f"building the {shape} files in {root} ({load_avg()}) ...", file=sys.stderr)
    model = random_model(shape)
    if not (base / "config.json").is_file():
        save(state_for_saving(model), model.config, base)
    for bits in (8, 4):
        if not (paths[f"int{bits}"] / "config.json").is_file():
            save_quantized(base, paths[f"int{bits}"], QuantSpec(bits, 64))
    kquants.SEARCH = shape == "mini"  # the full scale search costs minutes per 100M weights in numpy
    for kind in ("Q8_0", "Q4_K"):
        if not paths[f"gguf-{kind}"].is_file():
            write_zaya_gguf(model, paths[f"gguf-{kind}"], kind, reference=False)
    for kind, key in (("fp8-channel", "ct-fp8"), ("mxfp4", "ct-mxfp4")):
        if not (paths[key] / "config.json").is_file():
            write_ct_checkpoint(model, paths[key], kind, reference=False)
    return paths


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ------------------------------------------------------------------------------------ load memory
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
LOAD_CODE = """
import sys, time, json
import torch, zaya
def status(key):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ':'))
before = status('VmRSS')
t = time.perf_counter()
llm = zaya.load(sys.argv[1], dtype='bf16')
took = time.perf_counter() - t
from zaya.formats import StoredMatrix  # the layouts kept compressed (GGUF, FP8, MXFP4), in bytes
kept = sum(m.nbytes for m in llm.model.modules() if isinstance(m, StoredMatrix))
print(json.dumps({'before': before, 'peak': status('VmHWM'), 'after': status('VmRSS'), 'seconds': took,
                  'kept': kept}))
"""


def load_memory(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_CODE, str(path)], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    size = size_of(path)
    return {"file_bytes": size, "peak_above_start_bytes": r["peak"] - r["before"],
            "peak_over_file": round((r["peak"] - r["before"]) / size, 3),
            "resident_after_bytes": r["after"] - r["before"], "load_seconds": round(r["seconds"], 1),
            "kept_layout_bytes": r["kept"]}


# ----------------------------------------------------------------------------------------- decode
def decode_speed(llm, tokens: int) -> float:
    prompt = torch.randint(10, llm.config.vocab_size - 10, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    start = time.perf_counter()
    out = llm.generate([prompt], max_new_tokens=tokens, temperature=0, ignore_eos=True)
    assert len(out[0].token_ids) == tokens
    return tokens / (time.perf_counter() - start)


def decode_pairs(paths: dict[str, Path], rounds: int, tokens: int) -> dict:
    import zaya

    results = {}
    for ref, cand in PAIRS:
        models = {name: zaya.load(paths[name], dtype="bf16") for name in (ref, cand)}
        for llm in models.values():
            decode_speed(llm, 4)  # warm-up: first calls build kernels and caches
        speeds = {ref: [], cand: []}
        for r in range(rounds):
            for name in ((ref, cand) if r % 2 == 0 else (cand, ref)):
                speeds[name].append(decode_speed(models[name], tokens))
        med = {k: statistics.median(v) for k, v in speeds.items()}
        results[f"{cand} vs {ref}"] = {"tok_s": {k: round(v, 2) for k, v in med.items()},
                                       "ratio": round(med[cand] / med[ref], 3), "load": load_avg()}
        print(f"decode {cand:>10} {med[cand]:7.2f} tok/s  {ref:>5} {med[ref]:7.2f} tok/s  ratio "
              f"{med[cand] / med[ref]:.3f}  ({load_avg()})", flush=True)
        del models
    return results


# ---------------------------------------------------------------------------------------- quality
@torch.inference_mode()
def quality(paths: dict[str, Path]) -> dict:
    import zaya

    prompts = torch.randint(10, 30000, (4, 64), generator=torch.Generator().manual_seed(2))
    ref = zaya.load(paths["bf16"], dtype="bf16").logits(prompts).float().log_softmax(-1)
    out = {}
    for name in ("int8", "gguf-Q8_0", "ct-fp8", "int4", "gguf-Q4_K", "ct-mxfp4"):
        lp = zaya.load(paths[name], dtype="bf16").logits(prompts).float().log_softmax(-1)
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        top1 = (ref.argmax(-1) == lp.argmax(-1)).float().mean().item()
        out[name] = {"top1_agreement": round(top1, 4), "kl": float(f"{kl:.3g}")}
        print(f"quality {name:>10}  top-1 agreement {top1:.4f}  KL {kl:.3g}", flush=True)
    return out


LABELS = {"bf16": "bf16 safetensors", "int8": "zaya int8 (g64)", "int4": "zaya int4 (g64)",
          "gguf-Q8_0": "GGUF Q8_0", "gguf-Q4_K": "GGUF Q4_K", "ct-fp8": "compressed-tensors FP8 experts",
          "ct-mxfp4": "compressed-tensors MXFP4 experts"}


def table(report: dict) -> str:
    """The README's table: size, memory, decode speed against zaya's own format, quality."""
    speed = {}
    for key, r in report.get("decode", {}).items():
        cand, ref = key.split(" vs ")
        speed[cand] = f"{r['tok_s'][cand]:.2f} vs {r['tok_s'][ref]:.2f} {ref}: **{r['ratio']:.2f}x**"
        speed[ref] = "reference"
    files, quality = report.get("files", {}), report.get("quality", {})
    rows = ["| file | size | memory after loading (peak while loading / file) | decode b1 tok/s vs zaya's, alternated "
            "| top-1 / KL vs bf16 |", "|---|---|---|---|---|"]
    for name in LABELS:
        m, q = files.get(name), quality.get(name)
        size = "-" if m is None else f"{m['file_bytes'] / 1e9:.3f} GB"
        memory = "-" if m is None else f"{m['resident_after_bytes'] / 1e9:.3f} GB ({m['peak_over_file']:.2f}x)"
        qual = "reference" if name == "bf16" else "-" if q is None else f"{q['top1_agreement']:.3f} / {q['kl']:.2g}"
        rows.append(f"| {LABELS[name]} | {size} | {memory} | {speed.get(name, '-')} | {qual} |")
    return "\n".join(rows)


def measure(paths: dict[str, Path], phases: set[str], args) -> dict:
    report = {"shape": args.shape, "threads": args.threads, "cpus": os.cpu_count(), "load_start": load_avg()}
    print(f"{args.shape}: {args.threads} threads, {load_avg()}", flush=True)
    if "load" in phases:
        report["files"] = {}
        for name, path in paths.items():
            m = load_memory(path)
            report["files"][name] = dict(m, load=load_avg())
            print(f"load {name:>10} {m['file_bytes'] / 1e9:6.3f} GB  peak +{m['peak_above_start_bytes'] / 1e9:6.3f} "
                  f"GB ({m['peak_over_file']:.2f}x the file)  resident +{m['resident_after_bytes'] / 1e9:6.3f} GB  "
                  f"{m['load_seconds']:5.1f} s  ({load_avg()})", flush=True)
    if "decode" in phases:
        report["decode"] = decode_pairs(paths, args.rounds, args.tokens)
    if "quality" in phases and (args.shape == "mini" or args.quality):
        report["quality"] = quality(paths)
    report["load_end"] = load_avg()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="mini")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/zaya-formats-bench"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--phases", default="load,decode,quality", help="which of load, decode, quality to run")
    ap.add_argument("--quality", action="store_true", help="measure quality on this shape too (default: mini only)")
    ap.add_argument("--table", type=Path, help="print the markdown table of a saved JSON report and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text().strip().splitlines()[-1])))
        return
    torch.set_num_threads(args.threads)
    args.dir.mkdir(parents=True, exist_ok=True)
    report = measure(build(args.shape, args.dir), set(args.phases.split(",")), args)
    print(table(report))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
