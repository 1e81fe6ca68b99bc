"""Checkpoints on disk: config.json plus safetensors, in the native or the legacy layout.

* **native** (``Zyphra/ZAYA1-8B``, transformers' ``save_pretrained``): 40 fused blocks, experts
  stacked ``mlp.experts.gate_up_proj`` (E, 2I, H) / ``down_proj`` (E, H, I).
* **legacy** (``Zyphra/ZAYA1-8B-legacy``, ZAYA1-base): 80 alternating attention / MoE layers,
  ``zaya_block.*``, one ``local_experts.e`` per expert, and a ``res_scale`` at the *entry* of every
  layer that belongs to the sub-block before it. The mapping is Zyphra's
  ``convert_zaya_weights_to_hf.py`` (transformers fork, branch ``zaya1``).

Loading is strict and lazy: tensors are memory-mapped through ``safetensors.safe_open`` (never
unpickled), every expected tensor must be present exactly once with the right shape, and anything
unexpected is an error that names the tensor and the file it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from zaya.errors import CheckpointError, ConfigError
from zaya.model import ZayaConfig, ZayaForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT32_TENSORS = ("balancing_biases",)  # selection arithmetic is fp32 in the reference
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


# ----------------------------------------------------------------------------------- locating
def resolve(model: str | os.PathLike) -> Path:
    """A local directory, or a hub repo id fetched (with a progress bar) into the local cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and *.safetensors")
    name = str(model)
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", name):
        raise CheckpointError(f"no model directory at {path} (and {name!r} is not a hub repo id like 'Zyphra/ZAYA1-8B')")
    return download(name)


def download(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    try:  # a model pulled earlier needs no network
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(f"cannot download {repo_id}: the hub is unreachable (offline?) and it is not in the "
                              f"local cache. Pass a local directory instead, or `zaya pull {repo_id}` when online."
                              ) from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"cannot download {repo_id}: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot download {repo_id}: {exc}") from exc


# ------------------------------------------------------------------------------------- config
def read_config(path: Path) -> tuple[ZayaConfig, str]:
    """Parse config.json; returns the native config and the layout the config declares."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: a ZAYA checkpoint directory needs config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    layout = "legacy" if is_legacy_config(raw) else "native"
    try:
        return ZayaConfig.from_dict(legacy_config_to_native(raw) if layout == "legacy" else raw), layout
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def is_legacy_config(raw: dict) -> bool:
    return "zaya_use_mod" in raw or "ffn_hidden_size" in raw or "zaya_mlp_expansion" in raw


def legacy_config_to_native(raw: dict[str, Any]) -> dict[str, Any]:
    """Config conversion of Zyphra's converter (research note §3.2)."""
    out = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    layers = raw.get("num_hidden_layers", 80)
    if layers % 2:
        raise ConfigError(f"legacy config has an odd num_hidden_layers ({layers}); it must alternate attention/MoE")
    out["num_hidden_layers"] = layers // 2
    if "ffn_hidden_size" in raw:
        out["moe_intermediate_size"] = raw["ffn_hidden_size"] // 2
    if "zaya_mlp_expansion" in raw:
        out["router_hidden_size"] = raw["zaya_mlp_expansion"]
    if "norm_epsilon" in raw:
        out["rms_norm_eps"] = raw["norm_epsilon"]
    if "moe_router_topk" in raw:
        out["num_experts_per_tok"] = raw["moe_router_topk"]
    if "kv_channels" in raw:
        out["head_dim"] = raw["kv_channels"]
    if "num_query_groups" in raw:
        out["num_key_value_heads"] = raw["num_query_groups"]
    swa = raw.get("swa_layers")
    if swa:
        windows = list(swa)[::2]
        out["layer_types"] = ["hybrid_sliding" if w else "hybrid" for w in windows]
        if any(windows):
            out["sliding_window"] = max(windows) + 1  # legacy counts previous tokens only
    factor = raw.get("partial_rotary_factor", 0.5)
    out["rope_parameters"] = {
        "hybrid": {"rope_type": "default", "rope_theta": raw.get("rope_theta", 5_000_000.0),
                   "partial_rotary_factor": factor},
        "hybrid_sliding": {"rope_type": "default", "rope_theta": raw.get("swa_rotary_base") or 10_000.0,
                           "partial_rotary_factor": factor},
    }
    if raw.get("clamp_temp"):
        raise ConfigError("legacy config sets clamp_temp=true, which no published ZAYA1 checkpoint uses and zaya "
                          "does not implement")
    out["model_type"] = "zaya"
    return out


def native_config_to_legacy(config: ZayaConfig) -> dict[str, Any]:
    """The inverse of legacy_config_to_native (used to write legacy test checkpoints)."""
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


# ------------------------------------------------------------------------------------ layouts
_ATTN = {"qkv.linear_q": "qkv_proj.q_proj", "qkv.linear_k": "qkv_proj.k_proj",
         "qkv.val_proj1": "qkv_proj.v_proj_current", "qkv.val_proj2": "qkv_proj.v_proj_delayed",
         "qkv.conv_qk.0": "qkv_proj.conv_qk_depthwise", "qkv.conv_qk.1": "qkv_proj.conv_qk_grouped",
         "o_proj": "o_proj"}
_ROUTER = {"down_proj": "down_proj", "rmsnorm_eda": "router_mlp.norm", "router_mlp.0": "router_mlp.fc1",
           "router_mlp.2": "router_mlp.fc2", "router_mlp.4": "router_mlp.out_proj"}
_RES = ("hidden_states_scale", "hidden_states_bias", "residual_scale", "residual_bias")


def legacy_to_native_name(name: str, num_layers: int) -> tuple[str, int | None]:
    """Native name (and expert index for per-expert tensors) of a legacy tensor name."""
    if name in ("model.final_norm.weight",):
        return "model.norm.weight", None
    if name.startswith("model.res_scale."):
        return f"model.layers.{num_layers - 1}.post_mlp_residual_scale.{name.rsplit('.', 1)[1]}", None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        return name, None  # embed_tokens, lm_head
    old, rest = int(m.group(1)), m.group(2)
    k, attn = old // 2, old % 2 == 0
    if rest.startswith("res_scale."):
        leaf = rest.split(".", 1)[1]
        if attn:
            if k == 0:
                return f"model.input_{leaf}" if leaf.startswith("hidden_states") else f"!{name}", None
            return f"model.layers.{k - 1}.post_mlp_residual_scale.{leaf}", None
        return f"model.layers.{k}.post_attention_residual_scale.{leaf}", None
    if rest == "input_norm.weight":
        return f"model.layers.{k}.{'input_layernorm' if attn else 'post_attention_layernorm'}.weight", None
    if attn and rest == "self_attn.qkv.temp":
        return f"model.layers.{k}.self_attn.qk_norm.temp", None
    if attn and rest.startswith("self_attn."):
        module, leaf = rest[len("self_attn."):].rsplit(".", 1)
        if module in _ATTN:
            return f"model.layers.{k}.self_attn.{_ATTN[module]}.{leaf}", None
    if not attn and rest.startswith("zaya_block.router."):
        tail = rest[len("zaya_block.router."):]
        if tail in ("router_states_scale", "balancing_biases"):
            return f"model.layers.{k}.mlp.gate.{tail}", None
        module, leaf = tail.rsplit(".", 1)
        if module in _ROUTER:
            return f"model.layers.{k}.mlp.gate.{_ROUTER[module]}.{leaf}", None
    e = re.fullmatch(r"zaya_block\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight", rest)
    if not attn and e:
        which = "gate_up_proj" if e.group(2) == "1" else "down_proj"
        return f"model.layers.{k}.mlp.experts.{which}", int(e.group(1))
    return f"!{name}", None  # no native counterpart


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
                inv = {v: k2 for k2, v in _ATTN.items()}
                out[f"{a}.self_attn.{inv[module]}.{leaf}"] = t
            elif rest.startswith("mlp.gate."):
                tail = rest[len("mlp.gate."):]
                if tail in ("router_states_scale", "balancing_biases"):
                    out[f"{f}.zaya_block.router.{tail}"] = t
                else:
                    module, leaf = tail.rsplit(".", 1)
                    inv = {v: k2 for k2, v in _ROUTER.items()}
                    out[f"{f}.zaya_block.router.{inv[module]}.{leaf}"] = t
            elif rest.startswith("mlp.experts."):
                fc = "linear_fc1" if rest.endswith("gate_up_proj") else "linear_fc2"
                for e in range(t.shape[0]):
                    out[f"{f}.zaya_block.experts.local_experts.{e}.{fc}.weight"] = t[e]
            else:
                raise CheckpointError(f"no legacy name for {name}")
    return out


# ------------------------------------------------------------------------------------- reading
class TensorSource:
    """Index of every tensor in a checkpoint directory: name -> (file, shape, dtype), opened lazily."""

    def __init__(self, path: Path):
        self.path = path
        files = self._files(path)
        self.where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for file in files:
            handle = self._open(file)
            for name in handle.keys():
                if name in self.where:
                    raise CheckpointError(f"tensor {name} appears in both {self.where[name].name} and {file.name}")
                self.where[name] = file

    @staticmethod
    def _files(path: Path) -> list[Path]:
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index.name} lists shard(s) that are missing: {', '.join(missing)}")
            return files
        if (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE]
        files = sorted(path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" (found {', '.join(bins)}: pickle checkpoints are never loaded; convert them to safetensors)" \
                if bins else ""
            raise CheckpointError(f"no *.safetensors weights in {path}{hint}")
        return files

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}"
                                      ) from None
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.where[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        file = self.where[name]
        try:
            return self._open(file).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read tensor {name} from {file} (truncated or corrupt?): {exc}") from None

    def metadata(self) -> dict[str, str]:
        meta: dict[str, str] = {}
        for file in set(self.where.values()):
            meta.update(self._open(file).metadata() or {})
        return meta


def detect_layout(names) -> str:
    for name in names:
        if ".zaya_block." in name or ".res_scale." in name or name.startswith("model.res_scale.") \
                or name == "model.final_norm.weight":
            return "legacy"
    return "native"


def native_tensors(source: TensorSource, config: ZayaConfig) -> dict[str, Callable[[], torch.Tensor]]:
    """Map native names to loaders; per-expert legacy tensors are stacked on access."""
    layout = detect_layout(source.where)
    if layout == "native":
        return {name: (lambda n=name: source.get(n)) for name in source.where}
    out: dict[str, Callable[[], torch.Tensor]] = {}
    experts: dict[str, dict[int, str]] = {}
    for name in source.where:
        native, expert = legacy_to_native_name(name, config.num_hidden_layers)
        if native.startswith("!"):
            raise CheckpointError(f"unexpected tensor {name} in {source.where[name].name}: no place for it in the "
                                  "legacy ZAYA layout")
        if expert is None:
            if native in out:
                raise CheckpointError(f"tensors map twice onto {native} (second: {name} in {source.where[name].name})")
            out[native] = lambda n=name: source.get(n)
        else:
            experts.setdefault(native, {})[expert] = name
    for native, parts in experts.items():
        want = list(range(config.num_experts))
        if sorted(parts) != want:
            missing = sorted(set(want) - set(parts))
            extra = sorted(set(parts) - set(want))
            raise CheckpointError(f"{native}: legacy experts missing {missing} / unexpected {extra} "
                                  f"(config has num_experts={config.num_experts})")
        out[native] = lambda p=parts: torch.stack([source.get(p[e]) for e in range(len(p))])
    return out


def _plain_reader(source: TensorSource, config: ZayaConfig):
    """name -> that tensor read with plain file I/O (not through the mmap), or None when the
    checkpoint does not hold it under that name (legacy layout)."""
    from zaya.quant import read_aligned

    buffers: dict = {}  # one reusable buffer per expert matrix shape: no allocation churn

    def fetch(name: str, index: int | None = None):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        file = source.where.get(name)
        kind = name.rsplit(".", 1)[-1] if index is not None else None
        try:
            if file is None:
                return None
            t = read_aligned(file, name, index, buffers.get(kind))
            if kind is not None:
                buffers[kind] = t
            return t
        except KeyError:  # a dtype plain reads do not handle: use the parameter itself
            return None

    return fetch


def load_model(path: Path, *, dtype: torch.dtype | None = None, device=None, quantize: str | None = None
               ) -> tuple[ZayaForCausalLM, ZayaConfig, str]:
    """Build the model on the meta device and assign the checkpoint's tensors to it, strictly.

    A checkpoint written by ``zaya quantize`` (a ``quantization`` section in config.json) loads
    its quantized tensors directly; ``quantize`` quantizes a float checkpoint while loading."""
    from zaya import packed, quant

    config, config_layout = read_config(path)
    source = TensorSource(path)
    layout = detect_layout(source.where)
    if layout != config_layout:
        raise CheckpointError(f"{path}: config.json describes a {config_layout} checkpoint but the tensors are in "
                              f"the {layout} layout")
    stored = quant.QuantSpec.parse(config.quantization)
    wanted = quant.QuantSpec.parse(quantize)
    if stored and wanted and stored.bits != wanted.bits:
        raise CheckpointError(f"{path} is already quantized to int{stored.bits}; it cannot be loaded as "
                              f"int{wanted.bits} (quantize the float checkpoint instead)")
    spec = stored or wanted
    dtype = dtype or getattr(torch, config.dtype)
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
        if stored:
            quant.swap_modules(model, stored)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    loaders = native_tensors(source, config)
    origin = {n: source.where.get(n) for n in loaders}
    unexpected = sorted(set(loaders) - set(expected))
    if unexpected:
        n = unexpected[0]
        where = origin.get(n)
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        hint = " (config says tie_word_embeddings=true)" if n == "lm_head.weight" else ""
        raise CheckpointError(f"unexpected tensor {n}{' in ' + where.name if where else ''}{hint}{more}: "
                              "it does not belong to this config")
    missing = sorted(set(expected) - set(loaders))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]} is missing from the checkpoint in {path}{more}")
    state = {}
    reader = quant.PreadReader(source) if wanted and not stored else None
    for name, load in loaders.items():
        shape = source.shape(name) if name in source.where else None
        if shape is not None and shape != expected[name]:
            raise CheckpointError(f"tensor {name} in {origin[name].name} has shape {list(shape)}, expected "
                                  f"{list(expected[name])} from config.json")
        if reader is not None and quant.is_target(name):
            parts = reader.quantize(name, load, wanted, dtype)
            for qname, t in zip(quant.quantized_names(name, wanted), parts):
                state[qname] = t.to(device=device or "cpu")
            continue
        t = load()
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, expected {list(expected[name])}")
        if name.endswith(".qweight"):
            want_q = torch.int8 if stored.bits == 8 else torch.uint8
            if t.dtype != want_q:
                raise CheckpointError(f"tensor {name} has dtype {t.dtype}, expected {want_q} (int{stored.bits})")
            if stored.bits == 8 and (device is None or torch.device(device).type == "cpu"):
                t = quant.read_aligned(source.where[name], name)  # used as-is by the kernel: aligned, not mmap'd
            state[name] = t.to(device=device or "cpu")
            continue
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {name} in {origin.get(name) or path} has dtype {t.dtype}, expected floats")
        want = torch.float32 if name.endswith(FLOAT32_TENSORS) else dtype
        state[name] = t.to(device=device or "cpu", dtype=want)
    if wanted and not stored:
        with torch.device("meta"):
            quant.swap_modules(model, wanted)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.eval()
    if packed.available(dtype, device):  # the float linears (in a quantized model: the router's)
        packed.pack_model(model, _plain_reader(source, config))
    if spec:
        cpu = device is None or torch.device(device).type == "cpu"
        fetch = (lambda n: quant.FileRows(source.where[n], n, source.shape(n))) \
            if stored and stored.bits == 4 and cpu else None
        quant.prepare(model, dtype, fetch)
        model.config = dataclasses.replace(config, quantization=spec.to_config())
        model.model.config = model.config
    return model, model.config, layout


# ------------------------------------------------------------------------------------- writing
def state_for_saving(model: ZayaForCausalLM) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save(state: dict[str, torch.Tensor], config: ZayaConfig | dict, out: Path, *,
         max_shard_bytes: int | None = None, extra_files: list[Path] = ()) -> None:
    """Write config.json and safetensors (sharded with an index past ``max_shard_bytes``)."""
    out.mkdir(parents=True, exist_ok=True)
    raw = config.to_dict() if isinstance(config, ZayaConfig) else config
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    for f in extra_files:
        if Path(f).is_file():
            (out / Path(f).name).write_bytes(Path(f).read_bytes())


def tokenizer_files(path: Path) -> list[Path]:
    return [path / f for f in TOKENIZER_FILES if (path / f).is_file()]


def convert(src: Path, dst: Path) -> str:
    """Rewrite a checkpoint (legacy or native) in the native layout; returns the source layout."""
    src = resolve(src)
    config, _ = read_config(src)
    # load strictly first so a broken source never produces a half-written output
    model, config, layout = load_model(src, dtype=getattr(torch, config.dtype))
    save(state_for_saving(model), config, Path(dst), extra_files=tokenizer_files(src))
    return layout
