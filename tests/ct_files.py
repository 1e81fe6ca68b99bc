"""compressed-tensors checkpoints of tiny ZAYA models for tests, written with the package itself.

Only the experts are quantized, as in Zyphra's ``ZAYA1-8B-FP8-Experts`` / ``-MXFP4-Experts``
(``ignore: ["re:^(?!.*experts).*$"]``). compressed-tensors compresses a module's 2-D weight; each
expert matrix goes through the package's ``calculate_qparams`` and its compressor's ``compress``
as one module, and the results are stacked per ZAYA expert tensor: the values under the stack's
own name (FP8, as the published checkpoint has them) or ``<stack>.weight_packed`` (MXFP4), the
scales under ``<stack>.weight_scale``. The package's ``decompress`` of the same tensors is the
reference the tests build their float model from.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

IGNORE = ["re:^(?!.*experts).*$"]


def scheme(kind: str, block=(16, 32)):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if kind == "mxfp4":
        args = QuantizationArgs(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True,
                                dynamic=False, scale_dtype=torch.uint8, zp_dtype=torch.uint8)
    else:
        strategy = kind.split("-")[1]  # fp8-channel, fp8-tensor, fp8-block
        extra = {"block_structure": list(block)} if strategy == "block" else {}
        args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False, **extra)
    return QuantizationScheme(targets=["Linear"], weights=args)


def _minmax(w: torch.Tensor, kind: str, block) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    if kind == "mxfp4":
        g = w.reshape(n, k // 32, 32)
        return g.amin(-1), g.amax(-1)
    if kind == "fp8-tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if kind == "fp8-channel":
        return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    bn, bk = block
    g = w.reshape(n // bn, bn, k // bk, bk)
    return g.amin((1, 3)), g.amax((1, 3))


def compress_matrix(w: torch.Tensor, kind: str, block=(16, 32)) -> tuple[dict, torch.Tensor]:
    """(compressed tensors of one matrix, the package's dequantization of them)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    s = scheme(kind, block)
    lo, hi = _minmax(w.float(), kind, block)
    scale, _ = calculate_qparams(lo, hi, s.weights)
    fmt = "mxfp4-pack-quantized" if kind == "mxfp4" else "float-quantized"
    compressor = BaseCompressor.get_value_from_registry(fmt)
    packed = compressor.compress({"weight": w.float(), "weight_scale": scale}, s)
    ref = compressor.decompress(dict(packed), s)["weight"].float()
    return packed, ref


def write_ct_checkpoint(model, out: Path, kind: str = "fp8-channel", block=(16, 32), *, tokenizer_dir=None,
                        reference: bool = True):
    """Write ``model`` with compressed experts into ``out``; returns the reference float model
    (None with ``reference=False``)."""
    from zaya.checkpoint import save, state_for_saving

    out = Path(out)
    state = state_for_saving(model)
    ref = copy.deepcopy(model) if reference else None
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        parts = [compress_matrix(w, kind, block) for w in state[name]]
        stacked = {leaf: torch.stack([p[0][leaf] for p in parts]) for leaf in parts[0][0]}
        values = stacked.pop("weight_packed" if kind == "mxfp4" else "weight")
        state[name + (".weight_packed" if kind == "mxfp4" else "")] = values
        if kind == "mxfp4":
            del state[name]
        state[name + ".weight_scale"] = stacked.pop("weight_scale")
        if ref is not None:
            ref.get_parameter(name).data.copy_(torch.stack([p[1] for p in parts]))
    save(state, model.config, out, extra_files=[])
    config = json.loads((out / "config.json").read_text())
    s = scheme(kind, block)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized" if kind == "mxfp4" else "float-quantized",
        "quantization_status": "compressed", "ignore": IGNORE,
        "config_groups": {"group_0": json.loads(s.model_dump_json())},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            (out / f.name).write_bytes(f.read_bytes())
    return None if ref is None else ref.eval()


def rewrite(out: Path, **changes) -> None:
    """Edit config.json's quantization_config (for the bad-file tests)."""
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"].update(changes)
    (out / "config.json").write_text(json.dumps(config, indent=2))


__all__ = ["compress_matrix", "rewrite", "save_file", "write_ct_checkpoint"]
