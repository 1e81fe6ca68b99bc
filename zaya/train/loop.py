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

from zaya.errors import ConfigError, ZayaError
from zaya.checkpoint.adapters import save_adapter
from zaya.lora import adapter_names
from zaya.tokenizer import Tokenizer
from zaya.train import build, fsdp, memory
from zaya.train import checkpoints as ckpt
from zaya.train import data as data_mod
from zaya.train import dist as dist_mod
from zaya.train.balance import BalanceController, load_stats
from zaya.train.config import TrainConfig, check_files, lora_spec, tokenizer_dir
from zaya.train.plot import plot_metrics
from zaya.train.state import STATE_DIR, load_state

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
        self.spec = lora_spec(cfg)
        self.sharded = cfg.distributed.strategy == "fsdp"
        if cfg.distributed.cpu_offload and env.device.type != "cuda":
            raise ConfigError(f"{cfg.source}: distributed.cpu_offload moves state from the GPU to host memory; this "
                              f"run is on {env.device.type}")
        if self.sharded and not env.distributed:
            raise ConfigError(f"{cfg.source}: distributed.strategy is 'fsdp', which shards the model over ranks, but "
                              "this is one process; start it with torchrun --nproc-per-node N (N >= 2), or use "
                              "strategy 'ddp' (one process needs no sharding)")
        self.model = self._build_model()
        self.step = 0
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": o.weight_decay},
             {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        b = cfg.balance
        # under LoRA the biases belong to the frozen base (an adapter file has no place for them)
        self.balancer = BalanceController(self.model, lr=b.lr, betas=b.betas, eps=b.eps, weight_decay=b.weight_decay
                                          ) if b.enabled and self.spec is None else None
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
        self.forward = self.loss_model if self.sharded or not env.distributed else \
            dist_mod.ddp_wrap(self.loss_model, env)

    # ------------------------------------------------------------------------------- setup
    def _build_model(self):
        cfg, env = self.cfg, self.env
        init_from = Path(cfg.model.init_from) if cfg.model.init_from else None
        whole_state = self.resume_from is not None and self.spec is None  # the training state holds every weight
        config = build.model_config(cfg, self.tokenizer, self.resume_from if whole_state else init_from)
        need = max(self.data.info["max_token_id"], self.tokenizer.vocab_size - 1)
        if need >= config.vocab_size:
            raise ConfigError(f"the tokenizer in {self.tok_dir} produces ids up to {need} but the model's vocab_size "
                              f"is {config.vocab_size}")
        memory.check(memory.estimate(cfg, config, env.world, activations=False), env)
        self.loss_model = build.skeleton(cfg, config, sharded=self.sharded)
        adapters = None if self.resume_from else build.adapter_values(cfg, self.loss_model.lm)
        return build.materialise(self.loss_model.lm, env.device, cfg, None if whole_state else init_from,
                                 adapters=adapters, init=not whole_state)

    def _restore(self, path: Path) -> None:
        state = ckpt.read_trainer_state(path)
        saved, now = state["config"], self.cfg.to_dict()
        changed = [f"{s}.{k}" for s, k in RESUME_KEYS if saved.get(s, {}).get(k) != now[s][k]]
        if changed or state["data"]["fingerprint"] != self.data.info["fingerprint"]:
            what = ", ".join(changed) if changed else "the training data (its token fingerprint)"
            raise ConfigError(f"cannot resume from {path}: {what} changed since it was written, so the data order "
                              "would not be reproduced; restore them or start a new train.out_dir")
        lora = [f"lora.{k}" for k in ("r", "alpha", "targets") if saved.get("lora", {}).get(k) != now["lora"][k]]
        if lora:
            raise ConfigError(f"cannot resume from {path}: {', '.join(lora)} changed since it was written (the "
                              "adapters would not fit); restore them or start a new train.out_dir")
        load_state(path / STATE_DIR, self.model, self.optimizer)
        if self.balancer is not None and state.get("balance"):
            self.balancer.load_state_dict(state["balance"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.metrics.truncate(self.step)
        self.log(f"resuming from {path} at step {self.step}")

    # ------------------------------------------------------------------------------- steps
    def autocast(self):
        # FSDP computes in bf16 through its mixed-precision policy; the other strategies autocast
        enabled = self.cfg.train.precision == "bf16" and not self.sharded
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self) -> dict:
        env, step = self.env, self.step
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        targets = self.data.train.targets(self.order.step_rows(step))
        scale = env.world / max(1, targets)  # DDP and FSDP average gradients over ranks; undo that
        loss_sum = torch.zeros((), device=env.device)
        counts = None
        batches = self.order.micro_batches(step, env.rank, env.world)
        for i, rows in enumerate(batches):
            x, y, w = (t.to(env.device) for t in self.data.train.batch(rows))
            # DDP reduces once, after the last micro-batch; FSDP reduce-scatters every micro-batch
            # into the sharded gradients (holding unsharded ones between micro-batches costs memory)
            defer = i < len(batches) - 1 and self.forward is not self.loss_model
            with self.forward.no_sync() if defer else contextlib.nullcontext():
                with self.autocast():
                    loss, c = self.forward(x, y, w)
                (loss * scale).backward()
            loss_sum += loss.detach()
            counts = c if counts is None else counts + c
        env.all_reduce(loss_sum)
        env.all_reduce(counts)
        loss = float(loss_sum) / max(1, targets)
        grad_norm = fsdp.clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip or float("inf"))
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
        chunks = list(torch.arange(min(len(held), t.eval_batches * t.micro_batch)).split(t.micro_batch))
        sums = torch.zeros(2, dtype=torch.float64, device=env.device)
        # every rank runs the same number of forwards (FSDP gathers are collectives); a rank
        # without a chunk of its own runs the first one and counts nothing
        for i in range(-(-len(chunks) // env.world)):
            k = i * env.world + env.rank
            x, y, w = (v.to(env.device) for v in held.batch(chunks[k if k < len(chunks) else 0]))
            with self.autocast():
                loss, _ = self.loss_model(x, y, w)
            if k < len(chunks):
                sums[0] += loss.double()
                sums[1] += w.sum()
        env.all_reduce(sums)
        return float(sums[0] / sums[1].clamp_min(1))

    def save(self) -> None:
        state = {"step": self.step, "balance": self.balancer.state_dict() if self.balancer else None,
                 "rng": ckpt.rng_state(), "config": self.cfg.to_dict(), "world": self.env.world,
                 "data": {k: self.data.info[k] for k in ("fingerprint", "sequences", "documents")}}
        self.last_checkpoint = ckpt.write_checkpoint(
            self.cfg.out_dir, self.step, self.env, self.model, self.optimizer, state, weights=self._write_weights,
            tokenizer_dir=self.tok_dir, chat_template=self.template, keep=self.cfg.train.keep_checkpoints)

    def _write_weights(self, out: Path) -> None:
        """What inference loads: the adapter (LoRA), else the model in its config's dtype."""
        model, main = self.model, self.env.is_main
        if self.spec is not None:
            state = {n: fsdp.full_tensor(model.get_parameter(n)).detach().float().cpu() for n in adapter_names(model)}
            if main:
                save_adapter(out, state, self.spec, model, base=self.cfg.model.init_from)
            return
        if main:
            (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        ckpt.write_weights(out, build.base_tensors(model), getattr(torch, model.config.dtype), main)

    # --------------------------------------------------------------------------------- run
    def describe(self) -> None:
        cfg, info, c = self.cfg, self.data.info, self.model.config
        params = sum(p.numel() for p in self.model.parameters())
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        what = f"LoRA r={self.spec.r} on {', '.join(self.spec.targets)}: {trained / 1e6:.2f}M trained" \
            if self.spec else "every weight trained"
        self.log(f"model: {params / 1e6:.2f}M parameters, {c.num_hidden_layers} layers, {c.num_experts} experts"
                 f"{' (from ' + str(cfg.model.init_from) + ')' if cfg.model.init_from else ''}; {what}")
        self.log(f"data: {info['documents']} documents -> {info['sequences']} sequences of {cfg.data.seq_len + 1} "
                 f"tokens ({info['target_tokens']} targets); held out: {info['eval_documents']} documents")
        self.log(f"batch: {cfg.train.global_batch} sequences/step = {cfg.train.micro_batch} x {self.accum} accumulation"
                 f" x {self.env.world} ranks ({cfg.distributed.strategy}); {self.env.device}, {cfg.train.precision}"
                 f"{', activation checkpointing' if cfg.train.activation_checkpointing else ''}; balancing "
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
