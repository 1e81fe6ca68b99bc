"""ZAYA GGUF files (llama.cpp PR #23112's layout) written with the ``gguf`` package: zaya's logits
against the float model built from gguf-py's dequantization of the same file, the weights kept
compressed, the tokenizer rebuilt from the metadata, and the bad files."""

from __future__ import annotations

import struct

import pytest
import torch

import zaya
import zaya.kernels as zk
from tests.gguf_files import default_type, float_model_from, write_zaya_gguf
from tests.tiny_model import greedy_reference, make_tiny_model
from tests.tiny_tokenizer import make_tokenizer_dir
from zaya.checkpoint import load_tokenizer, resolve
from zaya.errors import CheckpointError
from zaya.formats import KernelEmbedding, KernelExperts, KernelLinear
from zaya.tokenizer import Tokenizer

pytest.importorskip("gguf")
# K-quant rows are 256 wide: every matrix's input width here is 256
SHAPE = dict(hidden_size=256, head_dim=64, moe_intermediate_size=256, num_hidden_layers=2)
IDS = torch.tensor([[2, 40, 41, 42, 100, 7, 300, 5, 17, 250, 3, 99]])
KINDS = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_0", "Q4_0", "F16", "BF16"]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(0, **SHAPE)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"), vocab_size=512, chat_template="{{ bos_token }}"
                              "{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}")


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, tokenizer_dir):
    """One file per type, with the reference float model of each."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind in KINDS:
        deq = write_zaya_gguf(model, root / f"tiny-{kind}.gguf", kind, tokenizer_dir=tokenizer_dir)
        out[kind] = (root / f"tiny-{kind}.gguf", deq)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_the_dequantized_float_model(files, model, kind):
    path, deq = files[kind]
    llm = zaya.load(path, dtype="fp32")
    ref = float_model_from(model, deq)
    with torch.no_grad():
        want = ref(IDS)
    got = llm.logits(IDS)
    # fp32 throughout: the kernels sum in another order than the GEMM, nothing else differs
    assert (got - want).abs().max().item() < 1e-4
    experts = llm.model.model.layers[0].mlp.experts
    quantized = kind not in ("F16", "BF16")
    assert isinstance(experts, KernelExperts) == quantized
    assert isinstance(llm.model.model.layers[1].self_attn.o_proj, KernelLinear) == quantized
    assert isinstance(llm.model.model.embed_tokens, KernelEmbedding) == quantized
    # greedy decoding with the cache follows the float model's full-sequence argmax
    tokens = llm.generate([IDS[0, :4].tolist()], max_new_tokens=6, temperature=0, ignore_eos=True)[0].token_ids
    assert tokens == greedy_reference(ref, IDS[0, :4].tolist(), 6)


@pytest.mark.parametrize("kind", ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_0", "Q4_0"])
def test_kept_weights_equal_gguf_py_dequantization_bit_for_bit(files, kind):
    path, deq = files[kind]
    llm = zaya.load(path, dtype="bf16")
    layer = llm.model.model.layers[1]
    assert torch.equal(layer.self_attn.qkv_proj.q_proj.kernels[0].dequantize(), deq["blk.2.attn_q.weight"])
    assert torch.equal(layer.mlp.experts.down_proj.kernels[3].dequantize(), deq["blk.3.ffn_down_exps.weight"][3])
    assert torch.equal(llm.model.model.embed_tokens.kernels[0].dequantize(), deq["token_embd.weight"])
    # a bf16 model runs the same weights (decode through the kernels, prefill on bf16 copies)
    assert torch.isfinite(llm.logits(IDS)).all()


def test_mixed_types_as_in_a_q4_k_m_file(tmp_path, model, tokenizer_dir):
    def q4_k_m(name, t):
        if t.dim() < 2 or "conv" in name or "router" in name or "ffn_gate" in name and "exps" not in name:
            return "F32"
        return "Q6_K" if "ffn_down_exps" in name or "token_embd" in name or "cca_val" in name else "Q4_K"

    deq = write_zaya_gguf(model, tmp_path / "m.gguf", type_of=q4_k_m, tokenizer_dir=tokenizer_dir)
    llm = zaya.load(tmp_path / "m.gguf", dtype="fp32")
    q = llm.config.quantization
    assert q["method"] == "gguf" and q["types"] == {"F32": 52, "Q4_K": 8, "Q6_K": 7}
    assert q["bytes"]["Q6_K"] == sum(t.n_bytes for t in __import__("gguf").GGUFReader(str(tmp_path / "m.gguf")).tensors
                                     if t.tensor_type.name == "Q6_K")
    want = float_model_from(model, deq)(IDS)
    assert (llm.logits(IDS) - want).abs().max().item() < 1e-4


def test_without_compiled_kernels_the_reference_path_gives_the_same_logits(files, monkeypatch):
    path, _ = files["Q4_K"]
    llm = zaya.load(path, dtype="fp32")
    fast = llm.logits(IDS[:, :3])
    monkeypatch.setattr(zk, "available", lambda: False)
    assert (llm.logits(IDS[:, :3]) - fast).abs().max().item() < 1e-4


def test_tokenizer_and_template_come_from_the_metadata(files, tokenizer_dir):
    path, _ = files["Q8_0"]
    ours, want = load_tokenizer(path), Tokenizer.from_dir(tokenizer_dir)
    texts = ["Hello! How can I assist you today?", "<start_of_turn>user\n<think>x</think> Café 中文 😀",
             "{\"name\": \"get_weather\"}\n\n  two  spaces"]
    for text in texts:
        assert ours.encode(text) == want.encode(text)
        assert ours.decode(want.encode(text)) == want.decode(want.encode(text))
    # special means typed CONTROL in the file; the converter (gguf-py's LlamaHfVocab) types only
    # transformers' all_special_ids so, which leaves <start_of_turn> out
    ids = want.encode(texts[0])
    assert ours.decode(ids, skip_special_tokens=True) == want.decode(ids, skip_special_tokens=True)
    assert ours.chat_template == want.chat_template
    assert ours.bos_id == want.bos_id and want.eos_ids <= ours.eos_ids
    llm = zaya.load(path)
    assert llm.tokenizer is not None
    out = llm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=3, temperature=0)
    assert out.completion.prompt_tokens > 2


def test_a_directory_with_one_gguf_file_resolves_to_it(tmp_path, files):
    path, _ = files["Q8_0"]
    (tmp_path / path.name).write_bytes(path.read_bytes())
    assert resolve(tmp_path) == tmp_path / path.name
    (tmp_path / "other.gguf").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="several GGUF files"):
        resolve(tmp_path)


def test_quantizing_a_gguf_again_is_refused(files):
    with pytest.raises(CheckpointError, match="already quantized"):
        zaya.load(files["Q8_0"][0], quantize="int8")


# ---------------------------------------------------------------------------------------- bad files
def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(exc.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


def test_truncated_file(tmp_path, files):
    path, _ = files["Q4_K"]
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError) as exc:
        zaya.load(tmp_path / "cut.gguf")
    _one_line(exc, "cut.gguf", "truncated")


def test_unknown_and_unsupported_tensor_types(tmp_path, model):
    def q4_1(name, t):  # a type gguf-py writes and zaya does not keep compressed
        return "Q4_1" if name == "blk.0.attn_q.weight" else default_type(name, t, "Q8_0")

    write_zaya_gguf(model, tmp_path / "q41.gguf", type_of=q4_1)
    with pytest.raises(CheckpointError) as exc:
        zaya.load(tmp_path / "q41.gguf")
    _one_line(exc, "q41.gguf", "blk.0.attn_q.weight", "Q4_1")

    # a type id no GGUF reader knows: patch the first tensor's type in the tensor infos
    data = bytearray((tmp_path / "q41.gguf").read_bytes())
    name = b"token_embd.weight"
    at = data.index(name) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 250)
    (tmp_path / "bad-type.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as exc:
        zaya.load(tmp_path / "bad-type.gguf")
    _one_line(exc, "bad-type.gguf", "unknown tensor type")


def test_wrong_architecture(tmp_path, model):
    write_zaya_gguf(model, tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(CheckpointError) as exc:
        zaya.load(tmp_path / "llama.gguf")
    _one_line(exc, "llama.gguf", "'llama'", "'zaya'")


def test_missing_tensor_is_named_by_its_gguf_name(tmp_path, model):
    write_zaya_gguf(model, tmp_path / "m.gguf", "Q8_0", drop=("blk.3.ffn_down_exps.weight",))
    with pytest.raises(CheckpointError) as exc:
        zaya.load(tmp_path / "m.gguf")
    _one_line(exc, "m.gguf", "blk.3.ffn_down_exps.weight", "missing")


def test_the_other_converters_layout_is_refused(tmp_path, model):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "fused.gguf"), "zaya")
    w.add_block_count(40)
    w.add_tensor("blk.0.attn_post_norm.weight", torch.ones(4).numpy())
    w.add_tensor("token_embd.weight", torch.ones(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError) as exc:
        zaya.load(tmp_path / "fused.gguf")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "Q6_K", "Q5_0"])
def test_large_tables_convert_in_row_blocks_to_the_same_layout(kind):
    from tests.gguf_files import encode
    from zaya.formats import Codec

    x = torch.randn(100, 256, generator=torch.Generator().manual_seed(0))
    data = torch.from_numpy(encode(x, kind)[0])
    codec = Codec(kind, 100, 256)
    whole, blocks = codec.kernel(data), codec.kernel_in_blocks(lambda rows: data[rows], rows=32)
    assert torch.equal(whole.dequantize(), blocks.dequantize())
    assert torch.equal(whole.data, blocks.data)


def test_info_shows_the_format_tensor_types_and_bytes(files, capsys):
    import json

    from zaya.cli import main

    path, _ = files["Q4_K"]
    assert main(["info", "--model", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "gguf" and report["file_bytes"] == path.stat().st_size
    assert report["quantization"]["types"] == {"F32": 52, "Q4_K": 15}
    assert main(["info", "--model", str(path)]) == 0
    assert "GGUF: Q4_K 15 tensors" in capsys.readouterr().out


def test_pull_quant_picks_one_file_and_shows_sizes(monkeypatch, capsys, tmp_path):
    import huggingface_hub

    from zaya import models_store as ms
    from zaya.errors import ZayaError

    files = {"ZAYA1-8B-Q4_K_M.gguf": 5_567_581_549, "ZAYA1-8B-Q8_0.gguf": 9_300_000_000, "README.md": 100}
    monkeypatch.setattr(ms, "_repo_files", lambda repo, rev: files)
    calls = []

    def fake_download(repo_id, **kw):
        calls.append(kw["allow_patterns"])
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    ms.pull("Abiray/ZAYA1-8B-GGUF", quant="q4_k_m")
    assert "ZAYA1-8B-Q4_K_M.gguf" in calls[0] and "ZAYA1-8B-Q8_0.gguf" not in calls[0]
    assert "5.6 GB" in capsys.readouterr().err
    with pytest.raises(ZayaError, match="no GGUF file for 'Q6_K'.*Q8_0.gguf \\(9.3 GB\\)"):
        ms.pull("Abiray/ZAYA1-8B-GGUF", quant="Q6_K")
    with pytest.raises(ZayaError, match="several GGUF files.*--quant"):
        ms.pick_gguf(files, None, "Abiray/ZAYA1-8B-GGUF")


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K"])
def test_quantized_files_decode_through_the_fused_step(files, kind):
    """Every layer of a quantized file gets the fused decode step (its experts stacked once), and
    greedy decoding gives the tokens the eager layers give."""
    from zaya import fused

    if not fused.enabled() or not zaya.kernels.available():
        pytest.skip("the fused step needs zaya's compiled kernels")
    llm = zaya.load(files[kind][0], dtype="bf16")
    layers = llm.config.num_hidden_layers
    # past 128 cached keys the eager attention is fp32 like the fused one, so bf16 near-ties agree
    prompt = torch.randint(3, 500, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = []
    for installed in (True, False, True):
        if installed:
            assert fused.install(llm.model) == layers
        else:
            fused.uninstall(llm.model)
        runs.append(llm.generate([prompt, prompt[:140]], max_new_tokens=8, temperature=0, ignore_eos=True))
    tokens = [[o.token_ids for o in run] for run in runs]
    assert tokens[0] == tokens[1] == tokens[2]
