"""Cold-start supervised fine-tuning on solution traces (loss on response tokens only).

The cold start decides where RL begins (finding F5): each trace style of a task (`long`, `short`, `answer`) gives
a different starting policy. Output: an HF-format checkpoint (config.json + model.safetensors + tokenizer.json)
in `runs/<name>/model`, `metrics.jsonl`, and `sft.json` with the held-out accuracy measured at the end.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from stablerl.checkpoint import RunLock
from stablerl.config import Config, lr_at, save_config, task_reward
from stablerl.engine import Engine
from stablerl.errors import UserError
from stablerl.evaluate import evaluate
from stablerl.hf import get_model, save_model
from stablerl.metrics import MetricsWriter
from stablerl.model import resolve_device
from stablerl.plots import plot_run_quietly
from stablerl.progress import log_lines
from stablerl.sequences import Packed, pack, policy_logprobs, select
from stablerl.tasks import task_examples
from stablerl.tokenizer import prompt_tokenizer


@dataclass(frozen=True)
class SFTResult:
    checkpoint: Path
    accuracy: float  # held-out greedy accuracy of the checkpoint
    final_loss: float
    seconds: float


def parse_style(spec: str) -> dict[str, float]:
    """`sft.style`: one trace style (`long`) or a mixture (`long:0.4,answer:0.6`) -> {style: probability}."""
    if ":" not in spec:
        return {spec.strip(): 1.0}
    mix: dict[str, float] = {}
    for part in spec.split(","):
        name, _, weight = part.partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not name.strip() or not math.isfinite(w) or w <= 0 or name.strip() in mix:
            raise UserError(f"sft.style: bad mixture part {part.strip()!r} in {spec!r}; expected distinct "
                            "style:weight pairs with weights > 0, e.g. long:0.4,answer:0.6")
        mix[name.strip()] = w
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


def sft_backward(model, batches: list[Packed], micro_size: int = 0, autocast=nullcontext, chunk: int = 0,
                 checkpoint: bool = False) -> torch.Tensor:
    """Token-mean cross-entropy on the response tokens of all `batches` together; accumulates its gradient.

    One padded batch per trace style, so a mixture's short traces are not padded to the long ones' length, each run
    `micro_size` rows at a time (0 = all): the sum of the parts divided by the step's token count is the loss of one
    batch holding every row, and so is the accumulated gradient. Log-probs come from the chunked LM head
    (`policy_logprobs`): no (n, T, V) logits."""
    n_tok = sum(int(b.mask.sum()) for b in batches)
    loss = torch.zeros(())
    for batch in batches:
        n = batch.ids.shape[0]
        for rows in torch.arange(n).split(micro_size or n):
            sub = select(batch, rows)
            with autocast():
                logp = policy_logprobs(model, sub, chunk=chunk, checkpoint=checkpoint).logp  # (n, T)
            part = -(logp.sum() / n_tok)
            part.backward()
            loss += part.detach().cpu()
    return loss


def run_sft(cfg: Config, show_progress: bool = True) -> SFTResult:
    with RunLock(cfg.run_dir()):  # one writer per run directory
        return _run_sft(cfg, show_progress)


def _run_sft(cfg: Config, show_progress: bool) -> SFTResult:
    run_dir = cfg.run_dir()
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    model, tok = get_model(cfg.model, seed=cfg.seed)
    tok = prompt_tokenizer(tok, cfg.task)  # the chat template, when task.chat_template asks for it
    examples = task_examples(cfg.task, "train")
    mix = parse_style(cfg.sft.style)
    for style in mix:
        missing = [i for i, e in enumerate(examples) if style not in e.traces]
        if missing:
            have = sorted(examples[missing[0]].traces) or ["none"]
            raise UserError(f"sft.style: {len(missing)} training examples have no {style!r} trace "
                            f"(example {missing[0]} has: {', '.join(have)})")
    styles = list(mix)
    probs = torch.tensor([mix[k] for k in styles], dtype=torch.float64)
    prompts = [tok.encode_prompt(e.prompt) for e in examples]
    if empty := [i for i, p in enumerate(prompts) if not p]:  # a tokenizer without BOS encodes "" to no tokens
        raise UserError(f"task: training example {empty[0]} has an empty prompt (no tokens, and the tokenizer adds "
                        f"no BOS); {len(empty)} such examples in all: give every example a prompt")
    responses = {k: [tok.encode(e.traces[k]) + [tok.eos_id] for e in examples] for k in styles}
    device = resolve_device(cfg.device)
    model.to(device).train()  # fp32 master weights and optimizer state; sft.dtype=bf16 autocasts the forward
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=cfg.sft.dtype == "bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft.lr, weight_decay=cfg.sft.weight_decay, betas=cfg.sft.betas)
    gen = torch.Generator().manual_seed(cfg.seed)
    heldout = task_examples(cfg.task, "heldout")
    writer = MetricsWriter(run_dir, tensorboard=True)

    def held_out(problems, step: int):
        """Greedy accuracy of the fp32 model itself (an engine copy: training is unaffected), logged at `step`."""
        res = evaluate(Engine(model, tok, numerics="fp32"), problems, cfg.engine.max_new_tokens,
                       reward=task_reward(cfg.task), timeout=cfg.task.reward_timeout, seed=cfg.seed)
        writer.log(step, {"eval/accuracy": res.accuracy, "eval/mean_length": res.mean_length})
        return res

    s = cfg.sft
    t0, tokens, loss_ema, curve = time.perf_counter(), 0, None, ""
    progress = Progress(TextColumn("sft"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not show_progress)
    log_lines(progress)  # a plain line every ~30 s where the bar cannot draw (a log file)
    with progress:
        bar = progress.add_task("sft", total=s.steps, info="")
        for step in range(s.steps):
            t_step = time.perf_counter()
            idx = torch.randint(len(examples), (s.batch_size,), generator=gen).tolist()
            # each example's trace style drawn from the mixture (a single style draws nothing: same stream as before)
            pick = torch.multinomial(probs, s.batch_size, replacement=True, generator=gen).tolist() if len(styles) > 1 \
                else [0] * s.batch_size
            batches = [pack([prompts[i] for i, k in zip(idx, pick) if k == j],
                            [responses[style][i] for i, k in zip(idx, pick) if k == j], tok.pad_id)
                       for j, style in enumerate(styles) if j in pick]
            batches = [b.to(device) for b in batches]
            lr = lr_at(step, s.lr, s.warmup_steps, s.steps)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = sft_backward(model, batches, s.micro_batch_size, autocast, cfg.train.logit_chunk,
                                cfg.train.activation_checkpointing)
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip))
            opt.step()
            tokens += sum(int(b.ids.ne(tok.pad_id).sum()) for b in batches)
            lv = float(loss.detach())
            loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
            tps = tokens / (time.perf_counter() - t0)
            writer.log(step, {"sft/loss": lv, "sft/lr": lr, "sft/grad_norm": gnorm, "sft/tokens_per_s": tps,
                              "time/step": time.perf_counter() - t_step})
            if s.eval_every and (step + 1) % s.eval_every == 0 and step + 1 < s.steps:
                # the SFT curve is steep where it crosses over (docs/log.md): the curve says where a run sits on it
                res = held_out(heldout[: s.eval_problems], step + 1)
                model.train()
                curve = f"  eval {res.accuracy:.1%}"
            progress.update(bar, advance=1, info=f"loss {loss_ema:.3f}  {tps:,.0f} tok/s{curve}")
    model.eval()
    ckpt = run_dir / "model"
    save_model(model, ckpt, tok)
    res = held_out(heldout, s.steps)
    seconds = time.perf_counter() - t0
    writer.close()
    plot_run_quietly(run_dir)
    summary = {"checkpoint": str(ckpt), "style": cfg.sft.style, "heldout_accuracy": res.accuracy, "n_heldout": res.n,
               "final_loss": loss_ema, "seconds": seconds, "samples": res.samples}
    (run_dir / "sft.json").write_text(json.dumps(summary, indent=2))
    return SFTResult(ckpt, res.accuracy, float(loss_ema), seconds)
