"""Where a batch-1 decode step's time goes: matmuls against everything else.

    python benchmarks/decode_profile.py benchmarks/.checkpoints/mini --steps 16 --threads 2

Loads the checkpoint as zaya does, prefills a 32-token prompt through ``LLM.engine()``, then runs
``--steps`` decode steps under ``torch.profiler`` and prints, per step: the wall time, how many
operators ran, and the self CPU time of the weight matmuls (zaya's ``mv_*`` kernels, oneDNN's
linears, PyTorch's packed int8/int4 kernels) against all other operators and the Python between
them; the fused per-layer operators (``zaya::fused_*``, zaya.fused: the layer's matmuls and
everything around them in one call) are counted on their own. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from zaya_side import ZayaRunner, prompts, set_threads  # noqa: E402

MATMUL_OPS = ("zaya::mv_", "mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm",
              "aten::linear", "aten::mm", "aten::addmm")
FUSED_OPS = ("zaya::fused_",)


def main(argv=None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from zaya.engine import Request
    from zaya.sampling import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    runner = ZayaRunner(args.path)
    runner.warm_up()
    engine = runner.llm.engine()
    params = SamplingParams.from_kwargs(max_new_tokens=2 * args.steps + 4, temperature=0, ignore_eos=True)
    engine.add(Request(prompts(1, 32, runner.vocab, 0)[0].tolist(), params))
    engine.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    plain = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    ops = sum(e.count for e in events) / args.steps
    matmul = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL_OPS)) / args.steps / 1e6
    fused = sum(e.self_cpu_time_total for e in events if e.key.startswith(FUSED_OPS)) / args.steps / 1e6
    other = sum(e.self_cpu_time_total for e in events
                if not e.key.startswith(MATMUL_OPS + FUSED_OPS)) / args.steps / 1e6
    top = sorted((e for e in events if not e.key.startswith(MATMUL_OPS)), key=lambda e: -e.self_cpu_time_total)[:8]
    print(f"{args.path.name}: step {plain * 1e3:.1f} ms unprofiled; {ops:.0f} operators per step; "
          f"matmuls {matmul * 1e3:.1f} ms, fused layer operators {fused * 1e3:.1f} ms, "
          f"other operators {other * 1e3:.1f} ms (self CPU, profiled)")
    for e in top:
        print(f"  {e.key:40s} {e.count / args.steps:6.1f}/step {e.self_cpu_time_total / args.steps / 1e3:7.2f} ms")
    print(json.dumps({"checkpoint": str(args.path), "step_s": plain, "ops_per_step": ops, "matmul_s": matmul,
                      "fused_s": fused, "other_ops_s": other, "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
