"""zaya against llama.cpp on a same-shape stand-in model: decode and prefill at matched precision.

    python benchmarks/compare_llamacpp.py --shape mini  --llama-python /work/bench/llama-venv/bin/python
    python benchmarks/compare_llamacpp.py --shape real4 --llama-python /work/bench/llama-venv/bin/python

llama.cpp runs through llama-cpp-python, which zaya never installs: give the benchmark its own
environment (llama.cpp is built from source with native CPU flags: about 12 minutes on 2 idle
cores):

    python -m venv /work/bench/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /work/bench/llama-venv/bin/pip install llama-cpp-python==0.3.36 gguf numpy

The stand-in (benchmarks/llamacpp_side.py) is a Mixtral-style llama-architecture GGUF of the
shape's hidden size, layers, vocabulary, 8 query / 2 KV heads of 128 and 16 experts of the FFN
width with one per token, random N(0, 0.02), written in F16 / BF16 by the gguf package and
quantized by llama.cpp to Q8_0, Q4_K_M and Q4_0. Pairs: zaya bf16 vs BF16 and F16, int8 vs Q8_0,
int4 vs Q4_K_M and Q4_0; zaya's checkpoints are the ones compare_transformers.py uses.

Every runner is a fresh process (load, warm up, each workload once), so only one model is in
memory at a time; a round runs them all in turn (zaya bf16, BF16, F16, zaya int8, Q8_0, ...), so
drift and other jobs on the machine hit every runner alike. Both sides use --threads threads.
Medians over rounds are printed with the ratio zaya / llama.cpp, the bytes of weights each side
reads per decode token, the GB/s that makes at batch 1, and the read bandwidth of a plain
reduction measured in every round. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from zaya_side import CHECKPOINTS, SHAPES, WORKLOADS, checkpoint_bytes_per_token  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
INSTALL = f"""{{python}} cannot import llama-cpp-python, gguf and numpy ({{error}}).
zaya does not install them; give the benchmark its own environment (llama-cpp-python builds
llama.cpp from source: about 12 minutes on 2 idle cores):

    python -m venv /work/bench/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /work/bench/llama-venv/bin/pip install llama-cpp-python=={LLAMA_CPP_PYTHON} gguf numpy

then pass --llama-python /work/bench/llama-venv/bin/python."""
PAIRS = {"bf16": ("BF16", "F16"), "int8": ("Q8_0",), "int4": ("Q4_K_M", "Q4_0")}
HEAD4 = ("Q4_K_M-h4", "Q4_0-h4")  # --head4: the 4-bit presets with the tied head in 4 bits too
LLAMA_WORKLOADS = ("decode_b1", "prefill_512", "decode_b1_ctx1024")


def _json_child(cmd: list[str], what: str) -> dict:
    """Run a child that ends with one JSON line; its stderr goes to ours only when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llama(python: str, *args: str) -> dict:
    return _json_child([python, str(HERE / "llamacpp_side.py"), *args], f"llama.cpp side ({args[0]})")


def llama_version(python: str) -> dict:
    """llama-cpp-python's version and build flags, or the install instructions and exit."""
    try:
        proc = subprocess.run([python, str(HERE / "llamacpp_side.py"), "version"], capture_output=True, text=True)
    except OSError as e:
        raise SystemExit(INSTALL.format(python=python, error=e))
    if proc.returncode != 0:
        error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(INSTALL.format(python=python, error=error))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def zaya_run(path: str, workloads: list[str], args, seed: int) -> dict:
    cmd = [sys.executable, str(HERE / "zaya_side.py"), "run", path, "--workloads", ",".join(workloads),
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--seed", str(seed)]
    return _json_child(cmd, f"zaya run of {path}")["tok_s"]


def bandwidth(threads: int) -> float:
    """The read bandwidth `zaya bench` measures (a reduction over 512 MB), with ``threads`` threads."""
    import torch

    from zaya.bench import measure_bandwidth

    torch.set_num_threads(threads)
    return measure_bandwidth()


# ---------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="mini")
    ap.add_argument("--dir", type=Path, default=CHECKPOINTS, help="where checkpoints and GGUF files are built once")
    ap.add_argument("--llama-python", default=os.environ.get("ZAYA_LLAMA_PYTHON", sys.executable),
                    help="interpreter with llama-cpp-python, gguf and numpy (default: $ZAYA_LLAMA_PYTHON, "
                         "else this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precisions", default="bf16,int8,int4", help=f"zaya sides of the pairs: {', '.join(PAIRS)}")
    ap.add_argument("--workloads", default=",".join(LLAMA_WORKLOADS))
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--threads", type=int, default=2, help="threads on both sides")
    ap.add_argument("--head4", action="store_true",
                    help="also pair int4 with Q4_K_M / Q4_0 whose tied head is 4-bit (the presets keep it in Q6_K), "
                         "matching zaya int4's bytes per token where the head dominates")
    args = ap.parse_args(argv)
    args.precisions, args.workloads = args.precisions.split(","), args.workloads.split(",")
    for p in args.precisions:
        if p not in PAIRS:
            ap.error(f"unknown precision {p!r}; use {', '.join(PAIRS)}")
    for w in args.workloads:
        if w not in LLAMA_WORKLOADS:
            ap.error(f"unknown workload {w!r}; use {', '.join(LLAMA_WORKLOADS)}")
    args.pairs = {p: PAIRS[p] + (HEAD4 if p == "int4" and args.head4 else ()) for p in args.precisions}
    return args


def prepare(args) -> tuple[dict, dict, dict]:
    """Build (once) both sides' files; the runners in round order, with the bytes each reads per token."""
    zaya_paths = _json_child([sys.executable, str(HERE / "zaya_side.py"), "build", "--shape", args.shape,
                              "--dir", str(args.dir)], "building the zaya checkpoints")
    kinds = [k for p in args.precisions for k in args.pairs[p]]
    spec = {**SHAPES[args.shape], "max_position_embeddings": 4096}
    gguf = llama(args.llama_python, "build", "--spec", json.dumps(spec), "--dir", str(args.dir / f"{args.shape}-gguf"),
                 "--types", ",".join(kinds), "--threads", str(args.threads))
    runners, per_token, detail = {}, {}, {}
    for p in args.precisions:
        runners[f"zaya {p}"] = ("zaya", zaya_paths[p])
        per_token[f"zaya {p}"] = checkpoint_bytes_per_token(Path(zaya_paths[p]))
        for k in args.pairs[p]:
            runners[f"llama {k}"] = ("llama", gguf[k]["path"])
            per_token[f"llama {k}"] = gguf[k]["bytes_per_token"]
            detail[f"llama {k}"] = gguf[k]["bytes_by_type"]
    return runners, per_token, detail


def print_bytes(args, per_token: dict, detail: dict) -> None:
    print(f"\n{args.shape}: weights read per decode token (one expert per layer, the tied head once)")
    for p in args.precisions:
        z = per_token[f"zaya {p}"]
        for k in args.pairs[p]:
            b = per_token[f"llama {k}"]
            types = ", ".join(f"{t} {n / 1e6:.1f}" for t, n in sorted(detail[f"llama {k}"].items(), key=lambda x: -x[1]))
            print(f"  zaya {p:<5} {z / 1e6:8.1f} MB   llama {k:<9} {b / 1e6:8.1f} MB   "
                  f"(stand-in / zaya {b / z:.3f}; stand-in MB by type: {types})")


def main(argv=None) -> int:
    args = parse_args(argv)
    info = llama_version(args.llama_python)
    print(f"llama-cpp-python {info['llama_cpp_python']} ({args.llama_python}): {info['system_info'].strip()}",
          file=sys.stderr)
    runners, per_token, detail = prepare(args)
    print_bytes(args, per_token, detail)
    workloads = {w: WORKLOADS[w] for w in args.workloads}
    samples = {(w, n): [] for w in args.workloads for n in runners}
    bw, loads = [], []
    print(f"\nper round, tok/s ({', '.join(args.workloads)}); load = 1-minute load average before the round")
    for rnd in range(args.rounds):
        loads.append(os.getloadavg()[0])
        bw.append(bandwidth(args.threads))
        print(f"round {rnd + 1}: load {loads[-1]:.2f}, read bandwidth {bw[-1] / 1e9:.1f} GB/s")
        for name, (side, path) in runners.items():
            if side == "zaya":
                tok_s = zaya_run(path, args.workloads, args, rnd)
            else:
                tok_s = llama(args.llama_python, "run", path, "--workloads", json.dumps(workloads),
                              "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--seed", str(rnd))
            for w in args.workloads:
                samples[(w, name)].append(tok_s[w])
            print(f"  {name:<17}" + "".join(f"{tok_s[w]:10.2f}" for w in args.workloads), flush=True)
    results = summarize(args, runners, samples, per_token, bw)
    results.update(llama_cpp=info, bytes_by_type=detail, loadavg_before_rounds=loads, rounds_tok_s={
        f"{w}|{n}": v for (w, n), v in samples.items()})
    print(json.dumps(results))
    return 0


def summarize(args, runners: dict, samples: dict, per_token: dict, bw: list[float]) -> dict:
    med = {w: {n: statistics.median(samples[(w, n)]) for n in runners} for w in args.workloads}
    bandwidth_med = statistics.median(bw)
    print(f"\n{args.shape}: median tok/s over {args.rounds} alternated rounds, {args.threads} threads "
          f"(ratio = zaya / llama.cpp)")
    print(f"{'workload':<20}{'zaya':<6}{'tok/s':>9}   {'llama.cpp':<10}{'tok/s':>9}{'ratio':>9}")
    ratios = {}
    for w in args.workloads:
        for p in args.precisions:
            z = med[w][f"zaya {p}"]
            for k in args.pairs[p]:
                ratio = z / med[w][f"llama {k}"]
                ratios.setdefault(w, {})[f"{p}/{k}"] = ratio
                print(f"{w:<20}{p:<6}{z:9.2f}   {k:<10}{med[w][f'llama {k}']:9.2f}{ratio:8.2f}x")
    gb_s = {}
    if "decode_b1" in args.workloads:
        print(f"\ndecode_b1 weight reads (tok/s x bytes per token), against {bandwidth_med / 1e9:.1f} GB/s "
              f"measured (median of the rounds: {', '.join(f'{b / 1e9:.1f}' for b in bw)})")
        for n in runners:
            gb_s[n] = med["decode_b1"][n] * per_token[n] / 1e9
            print(f"  {n:<17}{per_token[n] / 1e6:8.1f} MB/token  {gb_s[n]:6.2f} GB/s  ({gb_s[n] * 1e9 / bandwidth_med:.0%})")
    return {"shape": args.shape, "rounds": args.rounds, "threads": args.threads, "new_tokens": args.new_tokens,
            "tok_s": med, "ratio_zaya_over_llama": ratios, "bytes_per_token": per_token, "decode_b1_gb_s": gb_s,
            "bandwidth_gb_s": bandwidth_med / 1e9, "bandwidth_rounds_gb_s": [b / 1e9 for b in bw]}


if __name__ == "__main__":
    sys.exit(main())
