"""Training data: documents -> token ids with a loss mask -> fixed-length packed sequences.

Sources (one document per text file, one per JSONL line):

* plain text (any file not ending in ``.jsonl``), or a JSONL record ``{"text": ...}``: every
  token is a target. The tokenizer's own post-processor adds BOS/EOS (ZAYA1's appends
  ``<end_of_turn>``); an EOS is appended when it adds none, so documents stay separated.
* chat ``{"messages": [...], "tools": [...]?}``: rendered with the chat template exactly as at
  inference; only the assistant turns (content, reasoning, tool calls and the closing
  ``<end_of_turn>``) are targets.
* problem ``{"prompt" | "problem": ..., "completion" | "solution": ...}``: a user/assistant chat
  (``problem_style = "chat"``) or raw prompt + completion + EOS; only the completion is a target.
  ``"raw": true`` in a record makes that one raw whatever the style (a mix of both).

Packing: ``stream`` concatenates the shuffled documents and cuts windows of ``seq_len + 1``
tokens that overlap by one, so every token after the first is a target once. ``bfd`` puts whole
documents into windows by best-fit-decreasing (the ZAYA1 SFT recipe, report §IV-A), padding the
rest with masked pad tokens; a document longer than a window is cut into window-sized pieces.
Windows attend across document boundaries, as in GPT-style packing.

Order: documents are shuffled by the seed before the held-out split and packing; every epoch
visits the packed sequences in a fresh seeded permutation. Sequence ``i`` of the run's infinite
stream is a pure function of ``(seed, i)``, so resuming needs only the step number.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from zaya.chat import DEFAULT_CHAT_TEMPLATE, render_chat
from zaya.errors import ZayaError


class DataError(ZayaError):
    """Training data that is missing, unreadable or in an unknown format (names file and line)."""


@dataclass
class Document:
    ids: list[int]
    mask: list[bool]  # mask[j]: token j is a training target


class Encoder:
    """Turns records into Documents with the model's tokenizer and chat template."""

    def __init__(self, tokenizer, chat_template: str | None = None, problem_style: str = "chat"):
        self.tok = tokenizer
        self.template = chat_template
        self.problem_style = problem_style
        self.eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eos_ids, default=None)

    def text(self, text: str) -> Document:
        ids = self.tok.encode(text, add_special_tokens=True)
        if self.eos_id is not None and (not ids or ids[-1] not in self.tok.eos_ids):
            ids.append(self.eos_id)
        return Document(ids, [True] * len(ids))

    def chat(self, messages: list, tools=None) -> Document:
        template = self.template or self.tok.chat_template_for(tools) or DEFAULT_CHAT_TEMPLATE

        def render(msgs, generation_prompt):
            return render_chat(template, msgs, tools=tools, add_generation_prompt=generation_prompt,
                               bos_token=self.tok.bos_token, eos_token=self.tok.eos_token)

        text = render(messages, False)
        spans, cursor = [], 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            # The turn is what rendering message i adds after the generation prompt. Templates
            # may drop the reasoning of turns before the last user message, so look for the turn
            # without its reasoning too.
            plain = {k: v for k, v in message.items() if k not in ("reasoning_content", "reasoning", "thinking")}
            for candidate in (message, plain):
                turn = _added_text(render(messages[:i] + [candidate], False), render(messages[:i], True))
                pos = text.find(turn, cursor)
                if pos >= 0:
                    break
            if pos < 0:
                raise DataError(f"the chat template renders assistant message {i} differently in context, so its "
                                "tokens cannot be located for the loss mask")
            spans.append((pos, pos + len(turn)))
            cursor = pos + len(turn)
        enc = self.tok.backend.encode(text, add_special_tokens=False)
        starts = [s for s, _ in spans]
        mask = []
        for start, _ in enc.offsets:
            k = bisect.bisect_right(starts, start) - 1
            mask.append(k >= 0 and start < spans[k][1])
        return Document(list(enc.ids), mask)

    def problem(self, prompt: str, completion: str, raw: bool = False) -> Document:
        if self.problem_style == "chat" and not raw:
            return self.chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
        head = self.tok.encode_prompt(prompt)
        tail = self.tok.encode(completion, add_special_tokens=False)
        if self.eos_id is not None:
            tail.append(self.eos_id)
        return Document(head + tail, [False] * len(head) + [True] * len(tail))

    def record(self, rec) -> Document:
        if not isinstance(rec, dict):
            raise DataError(f"expected a JSON object, got {type(rec).__name__}")
        if "messages" in rec:
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
                raise DataError("'messages' must be a list of objects with a 'role'")
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError("the conversation has no assistant message to train on")
            return self.chat(msgs, rec.get("tools"))
        prompt = rec.get("prompt", rec.get("problem"))
        completion = rec.get("completion", rec.get("solution"))
        if prompt is not None or completion is not None:
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise DataError("a problem record needs string 'prompt' (or 'problem') and 'completion' "
                                "(or 'solution') fields")
            return self.problem(prompt, completion, raw=rec.get("raw") is True)
        if isinstance(rec.get("text"), str):
            return self.text(rec["text"])
        raise DataError(f"unknown record format with keys {sorted(rec)}; expected 'text', 'messages', or "
                        "'prompt'/'problem' with 'completion'/'solution'")


def _added_text(full: str, head: str) -> str:
    return full[len(os.path.commonprefix([full, head])):]


def read_documents(files: list[Path], encoder: Encoder) -> list[Document]:
    docs = []
    for file in files:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {file}: {exc}") from None
        if Path(file).suffix != ".jsonl":
            if text.strip():
                docs.append(encoder.text(text))
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(encoder.record(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{file}:{lineno}: not valid JSON ({exc.msg})") from None
            except ZayaError as exc:  # DataError, and chat template errors
                raise DataError(f"{file}:{lineno}: {exc}") from None
    return docs


# ------------------------------------------------------------------------------------ packing
@dataclass
class Packed:
    ids: torch.Tensor   # (N, seq_len + 1) int32
    mask: torch.Tensor  # (N, seq_len + 1) bool; column j says whether token j is a target

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, rows: torch.Tensor):
        """Inputs (B, T), targets (B, T) and their loss mask (B, T) for the given rows."""
        ids = self.ids[rows].long()
        return ids[:, :-1], ids[:, 1:], self.mask[rows, 1:]

    def targets(self, rows: torch.Tensor) -> int:
        return int(self.mask[rows, 1:].sum())

    def fingerprint(self) -> int:
        """A cheap checksum of the token order, to refuse resuming on different data."""
        flat = self.ids.flatten().long()
        weights = torch.arange(flat.numel(), dtype=torch.long) % 1_000_003 + 1
        return int((flat * weights).sum() % (2**61 - 1)) ^ int(self.mask.sum())


def pack_stream(docs: list[Document], seq_len: int, pad_id: int) -> Packed:
    ids = torch.tensor([t for d in docs for t in d.ids], dtype=torch.int32)
    mask = torch.tensor([m for d in docs for m in d.mask], dtype=torch.bool)
    n = max(1, -(-(ids.numel() - 1) // seq_len))
    pad = n * seq_len + 1 - ids.numel()
    ids = torch.cat([ids, torch.full((pad,), pad_id, dtype=torch.int32)])
    mask = torch.cat([mask, torch.zeros(pad, dtype=torch.bool)])
    return Packed(ids.unfold(0, seq_len + 1, seq_len).contiguous(), mask.unfold(0, seq_len + 1, seq_len).contiguous())


def pack_bfd(docs: list[Document], seq_len: int, pad_id: int) -> Packed:
    cap = seq_len + 1
    pieces = []
    for d in docs:  # over-long documents: window-sized pieces overlapping by one token, like stream
        for s in range(0, max(1, len(d.ids) - 1), cap - 1):
            pieces.append((d.ids[s:s + cap], d.mask[s:s + cap]))
    order = sorted(range(len(pieces)), key=lambda i: (-len(pieces[i][0]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        size = len(pieces[i][0])
        k = bisect.bisect_left(free, (size, -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (cap - size, len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - size, b))
    ids = torch.full((len(bins), cap), pad_id, dtype=torch.int32)
    mask = torch.zeros((len(bins), cap), dtype=torch.bool)
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            p_ids, p_mask = pieces[i]
            ids[b, at:at + len(p_ids)] = torch.tensor(p_ids, dtype=torch.int32)
            mask[b, at:at + len(p_ids)] = torch.tensor(p_mask, dtype=torch.bool)
            at += len(p_ids)
    return Packed(ids, mask)


# ------------------------------------------------------------------------------------- dataset
@dataclass
class Dataset:
    train: Packed
    eval: Packed | None
    info: dict


def build(cfg, tokenizer) -> Dataset:
    """Read, split and pack the data of a TrainConfig (every rank builds the same thing)."""
    d, seed = cfg.data, cfg.train.seed
    template = Path(d.chat_template).read_text(encoding="utf-8") if d.chat_template else None
    encoder = Encoder(tokenizer, template, d.problem_style)
    docs = read_documents(cfg.train_files(), encoder)
    if not docs:
        raise DataError(f"data.train ({', '.join(d.train)}) holds no documents (all files empty)")
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    docs = [docs[i] for i in perm]
    if d.eval:
        eval_docs = read_documents(cfg.eval_files(), encoder)
    elif d.holdout > 0:
        if len(docs) < 2:
            raise DataError("data.holdout needs at least two training documents to hold one out; list held-out "
                            "files in data.eval or set data.holdout = 0")
        k = min(len(docs) - 1, max(1, round(d.holdout * len(docs))))
        eval_docs, docs = docs[:k], docs[k:]
    else:
        eval_docs = []
    pack = pack_bfd if d.packing == "bfd" else pack_stream
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train = pack(docs, d.seq_len, pad_id)
    if train.targets(torch.arange(len(train))) == 0:
        raise DataError("the training data has no target tokens (every token is masked as prompt)")
    held = pack(eval_docs, d.seq_len, pad_id) if eval_docs else None
    info = {"documents": len(docs), "eval_documents": len(eval_docs), "sequences": len(train),
            "eval_sequences": len(held) if held is not None else 0,
            "target_tokens": int(train.mask[:, 1:].sum()), "max_token_id": int(train.ids.max()),
            "fingerprint": train.fingerprint()}
    return Dataset(train, held, info)


class Order:
    """Which sequences each optimizer step and each rank's micro-batches read.

    Step ``s`` takes positions ``s*G .. s*G+G-1`` of an endless stream that walks one seeded
    permutation of the sequences per epoch. The step's micro-batches are cut in that order and
    dealt to ranks round-robin, so the global batch does not depend on the world size.
    """

    def __init__(self, num_sequences: int, global_batch: int, micro_batch: int, seed: int):
        self.n, self.global_batch, self.micro_batch, self.seed = num_sequences, global_batch, micro_batch, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def step_rows(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs, within = pos // self.n, pos % self.n
        return torch.stack([self._perm(int(e))[int(w)] for e, w in zip(epochs, within)])

    def micro_batches(self, step: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
        rows = self.step_rows(step)
        chunks = list(rows.split(self.micro_batch))
        return chunks[rank::world]

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.n
