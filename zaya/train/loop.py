"""The training loop: AdamW with warm-up + cosine, gradient accumulation, DDP, balancing, checkpoints.

One optimizer step reads ``global_batch`` sequences, cut into micro-batches of ``micro_batch``
and dealt round-robin to the ranks (accumulation = global_batch / (micro_batch * world)). The
loss is the mean cross-entropy over the step's target tokens, normalised by the global target
count (known up front from the packed data), so 1 process and N processes compute the same sum
and differ only by float summation order. After the step the expert counts of all micro-batches
and ranks are summed and fed to the balancing controller.

Weights and optimizer state are fp32; ``precision = "bf16"`` wraps the forward in autocast.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from zaya.checkpoint import load_model
from zaya.config import ZayaConfig
from zaya.errors import ConfigError, ZayaError
from zaya.model import ZayaForCausalLM
from zaya.tokenizer import Tokenizer
from zaya.train import checkpoints as ckpt
from zaya.train import data as data_mod
from zaya.train import dist as dist_mod
from zaya.train.balance import BalanceController, load_stats
from zaya.train.config import TrainConfig, check_files, tokenizer_dir
from zaya.train.plot import plot_metrics

# What must match for a resumed run to see the same data in the same order (besides the packed
# tokens themselves, compared by fingerprint, which also catches changed files or tokenizers).
RESUME_KEYS = (("data", "seq_len"), ("data", "packing"), ("train", "seed"), ("train", "global_batch"))


class TrainingError(ZayaError):
    """The run cannot go on (a non-finite loss or gradient); the message says what is kept."""


@dataclass
class Result:
    step: int
    loss: float | None
    eval_loss: float | None
    load_entropy: float | None
    checkpoint: Path | None
    metrics: Path


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to optim.lr, then cosine to optim.min_lr at the last step (step is 0-based)."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the masked-in targets (fp32 logits, as the reference's LM head)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * mask.flatten()).sum()


class MetricsLog:
    """metrics.jsonl beside the checkpoints: one JSON object per step, plus eval records."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate(self, last_step: int) -> None:
        """Drop records past ``last_step`` (written after the checkpoint a resume starts from)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= last_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Trainer:
    def __init__(self, cfg: TrainConfig, env: dist_mod.DistEnv, resume: bool, log=print):
        self.cfg, self.env, self.log = cfg, env, (log if env.is_main else (lambda *a, **k: None))
        t = cfg.train
        out = cfg.out_dir
        existing = ckpt.latest_checkpoint(out)
        if existing is not None and not resume:
            raise ConfigError(f"{out} already holds checkpoints ({existing.name}); pass --resume to continue that "
                              "run, or choose another train.out_dir")
        if t.global_batch % (t.micro_batch * env.world):
            raise ConfigError(f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch "
                              f"({t.micro_batch}) x world size ({env.world})")
        self.accum = t.global_batch // (t.micro_batch * env.world)

        self.tok_dir = tokenizer_dir(cfg)
        self.tokenizer = Tokenizer.from_dir(self.tok_dir)
        self.template = Path(cfg.data.chat_template).read_text(encoding="utf-8") if cfg.data.chat_template else None
        self.data = data_mod.build(cfg, self.tokenizer)
        self.order = data_mod.Order(len(self.data.train), t.global_batch, t.micro_batch, t.seed)

        self.resume_from = existing if resume else None
        self.model = self._build_model()
        self.step = 0
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        b = cfg.balance
        self.balancer = BalanceController(self.model, lr=b.lr, betas=b.betas, eps=b.eps,
                                          weight_decay=b.weight_decay) if b.enabled else None
        self.metrics = MetricsLog(out / "metrics.jsonl", env.is_main)
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif resume:
            self.log(f"no checkpoint in {out}; starting from step 0")
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(out)
            if self.resume_from is None:
                self.metrics.path.unlink(missing_ok=True)
                (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.last_checkpoint = self.resume_from
        self.ddp = self.model
        if env.distributed:
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            # the biases are kept equal by construction (every rank applies the same update from
            # all-reduced counts), so there is nothing to broadcast before each forward
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
                DistributedDataParallel).parameters else "broadcast_buffers"
            self.ddp = DistributedDataParallel(self.model, device_ids=[env.device] if env.device.type == "cuda"
                                               else None, **{no_sync: False})

    # ------------------------------------------------------------------------------- setup
    def _build_model(self):
        cfg, dev = self.cfg, self.env.device
        source = self.resume_from or (Path(cfg.model.init_from) if cfg.model.init_from else None)
        if source is not None:
            model, config, _ = load_model(source, dtype=torch.float32, device=dev)
        else:
            tok = self.tokenizer
            shape = {"vocab_size": -(-tok.vocab_size // 64) * 64, "bos_token_id": tok.bos_id,
                     "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "dtype": "float32",
                     **cfg.model.shape}
            try:
                config = ZayaConfig.from_dict(shape)
            except ConfigError as exc:
                raise ConfigError(f"{cfg.source}: [model] {exc}") from None
            with torch.device("meta"):
                model = ZayaForCausalLM(config)
            model.to_empty(device=dev)
            model.tie_weights()
            model.init_weights(cfg.train.seed)
        need = max(self.data.info["max_token_id"], self.tokenizer.vocab_size - 1)
        if need >= config.vocab_size:
            raise ConfigError(f"the tokenizer in {self.tok_dir} produces ids up to {need} but the model's vocab_size "
                              f"is {config.vocab_size}")
        return model.train()

    def _restore(self, path: Path) -> None:
        state = ckpt.read_trainer_state(path)
        saved, now = state["config"], self.cfg.to_dict()
        changed = [f"{s}.{k}" for s, k in RESUME_KEYS if saved.get(s, {}).get(k) != now[s][k]]
        if changed or state["data"]["fingerprint"] != self.data.info["fingerprint"]:
            what = ", ".join(changed) if changed else "the training data (its token fingerprint)"
            raise ConfigError(f"cannot resume from {path}: {what} changed since it was written, so the data order "
                              "would not be reproduced; restore them or start a new train.out_dir")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.balancer is not None and state.get("balance"):
            self.balancer.load_state_dict(state["balance"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.metrics.truncate(self.step)
        self.log(f"resuming from {path} at step {self.step}")

    # ------------------------------------------------------------------------------- steps
    def autocast(self):
        enabled = self.cfg.train.precision == "bf16"
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self) -> dict:
        env, step = self.env, self.step
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        targets = self.data.train.targets(self.order.step_rows(step))
        scale = env.world / max(1, targets)  # DDP averages gradients over ranks; undo that
        loss_sum = torch.zeros((), device=env.device)
        counts = None
        batches = self.order.micro_batches(step, env.rank, env.world)
        for i, rows in enumerate(batches):
            x, y, w = (t.to(env.device) for t in self.data.train.batch(rows))
            sync = i == len(batches) - 1 or not env.distributed
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.autocast():
                    logits, c = self.ddp(x, expert_counts=True)
                loss = token_loss(logits, y, w)
                (loss * scale).backward()
            loss_sum += loss.detach()
            counts = c if counts is None else counts + c
        env.all_reduce(loss_sum)
        env.all_reduce(counts)
        loss = float(loss_sum) / max(1, targets)
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
            kept = (f"the last good checkpoint is {self.last_checkpoint} (continue with --resume, perhaps with a lower "
                    "optim.lr)" if self.last_checkpoint else "no checkpoint had been written yet")
            raise TrainingError(f"{what} at step {step + 1}; training stopped before applying it, and {kept}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.balancer is not None:
            self.balancer.update(counts)
        self.step += 1
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "targets": targets,
                **load_stats(counts, self.model.config.num_experts)}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        held = self.data.eval
        if held is None:
            return None
        t, env = self.cfg.train, self.env
        rows = torch.arange(min(len(held), t.eval_batches * t.micro_batch))
        sums = torch.zeros(2, dtype=torch.float64, device=env.device)
        for chunk in list(rows.split(t.micro_batch))[env.rank::env.world]:
            x, y, w = (v.to(env.device) for v in held.batch(chunk))
            with self.autocast():
                logits = self.model(x)
            sums[0] += token_loss(logits, y, w).double()
            sums[1] += w.sum()
        env.all_reduce(sums)
        return float(sums[0] / sums[1].clamp_min(1))

    def save(self) -> None:
        if self.env.is_main:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "balance": self.balancer.state_dict() if self.balancer else None,
                     "rng": ckpt.rng_state(), "config": self.cfg.to_dict(),
                     "data": {k: self.data.info[k] for k in ("fingerprint", "sequences", "documents")}}
            self.last_checkpoint = ckpt.write_checkpoint(
                self.cfg.out_dir, self.step, self.model, state, tokenizer_dir=self.tok_dir,
                chat_template=self.template, keep=self.cfg.train.keep_checkpoints)
        self.env.barrier()
        if not self.env.is_main:
            self.last_checkpoint = ckpt.latest_checkpoint(self.cfg.out_dir)

    # --------------------------------------------------------------------------------- run
    def describe(self) -> None:
        cfg, info, c = self.cfg, self.data.info, self.model.config
        params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {params / 1e6:.2f}M parameters, {c.num_hidden_layers} layers, {c.num_experts} experts"
                 f"{' (from ' + str(cfg.model.init_from) + ')' if cfg.model.init_from else ''}")
        self.log(f"data: {info['documents']} documents -> {info['sequences']} sequences of {cfg.data.seq_len + 1} "
                 f"tokens ({info['target_tokens']} targets); held out: {info['eval_documents']} documents")
        self.log(f"batch: {cfg.train.global_batch} sequences/step = {cfg.train.micro_batch} x {self.accum} accumulation"
                 f" x {self.env.world} ranks; {self.env.device}, {cfg.train.precision}; balancing "
                 f"{'on' if self.balancer else 'off'}")

    def run(self, stop_after: int | None = None) -> Result:
        from tqdm import tqdm

        t = self.cfg.train
        self.describe()
        bar = tqdm(total=t.steps, initial=self.step, disable=not (self.env.is_main and t.progress),
                   unit="step", dynamic_ncols=True)
        last, eval_loss = None, None
        tokens_per_step = t.global_batch * self.cfg.data.seq_len
        start = time.perf_counter()
        try:
            while self.step < t.steps:
                t0 = time.perf_counter()
                last = self.train_step()
                dt = time.perf_counter() - t0
                last.update(tok_s=tokens_per_step / dt, epoch=round(self.order.epoch(self.step), 4),
                            elapsed=round(time.perf_counter() - start, 3))
                self.metrics.write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tok_s']:.0f}", lr=f"{last['lr']:.2e}",
                                H=f"{last['load_entropy']:.3f}", refresh=False)
                bar.update(1)
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        self.metrics.write({"step": self.step, "eval_loss": eval_loss})
                        if self.env.is_main and t.progress:
                            bar.write(f"step {self.step}: eval loss {eval_loss:.4f}")
                if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps:
                    self.save()
                if stop_after is not None and self.step >= stop_after:
                    break
        finally:
            bar.close()
        if last is None:
            self.log(f"nothing to do: the run is already at step {self.step} of {t.steps}")
        else:
            self.log(f"step {self.step}: loss {last['loss']:.4f}"
                     f"{f', eval loss {eval_loss:.4f}' if eval_loss is not None else ''}, load entropy "
                     f"{last['load_entropy']:.3f}; checkpoint {self.last_checkpoint}")
        return Result(self.step, last and last["loss"], eval_loss, last and last["load_entropy"],
                      self.last_checkpoint, self.metrics.path)


def train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None, log=print) -> Result:
    """Run (or resume) the training a config describes; ``stop_after`` ends early after that step
    without a checkpoint, as a kill would (tests use it). Returns a summary of the final step."""
    check_files(cfg)
    env = dist_mod.init(cfg.train.device)
    try:
        torch.manual_seed(cfg.train.seed)
        trainer = Trainer(cfg, env, resume, log)
        result = trainer.run(stop_after)
        if cfg.train.plot and env.is_main:
            plot_metrics(result.metrics, Path(cfg.train.plot))
        return result
    finally:
        env.close()
