"""The RL loop (DESIGN §2 trainer, E4–E9), visible in one function: `train(cfg)`.

One global step: sample B prompts × G responses with the inference engine → rewards → group advantages (E4) →
`logp_old` from the training engine at θ_old, recording its routes → N mini-batch updates (E8), each minimising the
registered policy loss (E5/E6) with Routing Replay if asked (E7) → sync weights to the engine → diagnostics → log →
checkpoint. On-policy (N = 1, no top-p/top-k) θ_old is θ at the only update, so the update's own forward gives
`logp_old` of the rows it trains on; only the rows with Â = 0 get a θ_old pass, for the diagnostics. Every random
number comes from generators seeded by (seed, step), so a resumed run replays exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from stablerl import diagnostics as diag
from stablerl.algorithm import BatchSize, group_advantages, policy_loss, skips_zero_adv
from stablerl.checkpoint import RunLock, check_resume_config, list_checkpoints, load_trainer_state, save_checkpoint
from stablerl.config import Config, TrainConfig, check_replay, load_config, loss_hp, lr_at, save_config, task_reward
from stablerl.distributed import Parallel
from stablerl.engine import Engine, Rollout, route_dtype
from stablerl.errors import UserError
from stablerl.evaluate import evaluate
from stablerl.hf import get_model
from stablerl.memory import memory_limit, over_limit, release, rows_per_pass, step_metrics
from stablerl.metrics import MetricsWriter, read_metrics, truncate_after
from stablerl.model import resolve_device
from stablerl.plots import plot_run_quietly
from stablerl.progress import log_lines
from stablerl.rewards import score
from stablerl.rollout import make_backend
from stablerl.sequences import Packed, PolicyLogProbs, pack, policy_logprobs, select
from stablerl.tasks import task_examples
from stablerl.tokenizer import prompt_tokenizer
from stablerl.util import finite, write_text_atomic
from stablerl.warning import Watch


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    initial_accuracy: float | None
    final_accuracy: float | None
    seconds: float
    initial_length: float | None = None  # mean greedy response tokens on the held-out set
    final_length: float | None = None
    peak_rss_gib: float | None = None  # the run's largest resident set (mem/peak_gib), None off Linux
    final_eval_step: int | None = None  # the step of final_accuracy: before `steps` when a run stopped between evals


def _gen(seed: int, step: int, salt: int) -> torch.Generator:
    """Independent stream per (seed, step, purpose): resuming at `step` reproduces every draw."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 7919 + salt) % (2**63))


def full_routes(ro: Rollout, packed: Packed) -> torch.Tensor | None:
    """The engine's routes laid out like the training batch (N, S, L, K): prompt then response tokens (R3)."""
    if ro.routes_infer is None:
        return None
    N, S = packed.ids.shape
    L, K = ro.routes_infer.shape[2:]
    # (N, S, L, K) in the engine's compact route dtype; padding keeps expert 0: its outputs are never read
    out = torch.zeros(N, S, L, K, dtype=ro.routes_infer.dtype)
    for i in range(N):
        p, t = int(packed.prompt_lens[i]), int(packed.resp_lens[i])
        out[i, :p] = ro.prompt_routes[i]
        out[i, p : p + t] = ro.routes_infer[i, :t]
    return out.to(packed.ids.device)


def seq_token_mask(packed: Packed) -> torch.Tensor:
    """(N, S) True on real (prompt or response) tokens of the packed batch."""
    S = packed.ids.shape[1]
    lengths = packed.prompt_lens + packed.resp_lens
    return torch.arange(S, device=lengths.device)[None] < lengths[:, None]


def train(cfg: Config, resume: bool = False, show_progress: bool = True, console: Console | None = None,
          overwrite: bool = False) -> TrainResult:
    """RL from `cfg`. A run directory that holds an earlier run is continued (`resume`), started over (`overwrite`:
    its files are deleted first), or refused with one line: nothing is lost by accident. Under torchrun every rank
    calls this; rank 0 writes the run directory (stablerl.distributed)."""
    par = Parallel.setup(cfg)  # a single process unless launched by torchrun
    try:
        if not par.main:  # one console and one progress bar per job
            console, show_progress = Console(quiet=True), False
        with RunLock(cfg.run_dir()) if par.main else nullcontext():  # one writer per run directory
            return _train(cfg, resume, show_progress, console or Console(), overwrite, par)
    finally:
        par.close()


def _train(cfg: Config, resume: bool, show_progress: bool, console: Console, overwrite: bool,
           par: Parallel) -> TrainResult:
    run_dir = cfg.run_dir()
    e, a, t = cfg.engine, cfg.algo, cfg.train
    point = resume_point(run_dir, console) if resume else None
    if resume and point is None:
        console.print(f"[yellow]--resume: no checkpoint in {run_dir}, starting from step 0[/yellow]")
    if point is None and par.main:
        clear_run(run_dir, overwrite or resume)
    if point is not None and (run_dir / "config.yaml").exists():  # checked before anything in run_dir is touched
        check_resume_config(load_config(run_dir / "config.yaml"), cfg, run_dir / "config.yaml")
    ckpt, model, tok, state = point or (None, *get_model(cfg.init or cfg.model, seed=cfg.seed), {})
    if ckpt is not None:
        par.check_resume(ckpt, state)
    tok = prompt_tokenizer(tok, cfg.task)  # the chat template, when task.chat_template asks for it
    start = state.get("step", 0)
    check_replay(cfg, model.is_moe)
    if par.main:
        save_config(cfg, run_dir / "config.yaml")  # before step 0: the run directory always says how it was made
    device = par.device(resolve_device(cfg.device))
    model.to(device).train()  # fp32 master weights and optimizer state; train.dtype=bf16 autocasts the forward
    forward = par.wrap(model)  # DDP / FSDP2 under torchrun; the optimizer is built on the wrapped parameters
    opt = make_optimizer(model, t)
    if ckpt is not None:
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
        else:
            par.load_optimizer(state["optimizer_dir"], model, opt)
        console.print(f"resuming {run_dir} from {ckpt.name}")
    # its own copy of the weights, cast to its numerics; FSDP's shards are gathered one layer at a time
    engine = make_backend(cfg, model, tok, gather=par.gather)  # engine.backend: native (stablerl's) or vllm
    examples = task_examples(cfg.task, "train")
    reward_fn = task_reward(cfg.task)
    heldout = task_examples(cfg.task, "heldout")
    # every file of the run directory continues from the resumed step: rows a crashed run wrote after it are dropped
    writer = MetricsWriter(run_dir, resume_step=start if ckpt is not None else None) if par.main else None
    samples_path, metrics_path = run_dir / "samples.jsonl", run_dir / "metrics.jsonl"
    if ckpt is not None and par.main:
        truncate_after(samples_path, start)
    B, G = t.batch_prompts, t.group_size
    sampling = dict(temperature=e.temperature, top_p=e.top_p, top_k=e.top_k)
    learner = Learner(cfg, model, forward, opt, tok.pad_id, device, par)
    monitor = Monitor(t, Watch.of(t.warn_on), state.get("bad_in_row", 0))
    if ckpt is not None and t.warn_on:  # resumed: each rule continues from the side its signal was on, not anew
        for row in par.broadcast(read_metrics(metrics_path) if par.main else None):
            if 1 <= row.get("step", 0) <= start:
                monitor.watch.check(row)
    done = start
    t_start = time.perf_counter()
    mem_limit = memory_limit()  # the guard's reference (train.max_rss_frac)

    def run_eval(step: int) -> dict[str, float]:
        # held-out accuracy of the policy itself (fp32), not of the sampler's copy; built per eval, not kept. Every
        # rank builds it (FSDP gathers the weights), rank 0 evaluates and logs.
        policy = Engine(model, tok, numerics="fp32", gather=par.gather)
        if not par.main:
            return {}
        res = evaluate(policy, heldout, e.max_new_tokens, reward=reward_fn, timeout=cfg.task.reward_timeout,
                       seed=cfg.seed, n_samples=t.samples_per_eval)
        with samples_path.open("a") as f:
            for s in res.samples:
                f.write(json.dumps({"step": step, **s}) + "\n")
        return {"eval/accuracy": res.accuracy, "eval/mean_length": res.mean_length}

    def log(step: int, m: dict) -> None:
        if writer is not None:
            writer.log(step, m)

    if start == 0:
        log(0, run_eval(0))  # the cold start's accuracy: the baseline every later eval is compared with
    progress = Progress(TextColumn("rl"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                        disable=not show_progress)
    log_lines(progress)  # a plain line every ~30 s where the bar cannot draw (a log file)
    with progress:
        bar = progress.add_task("rl", total=t.steps, completed=start, info="")
        for step in range(start, t.steps):
            timing, m = {}, {}
            # ---- rollout: B prompts x G samples from the inference engine (μ_θold); each rank samples its share ----
            t0 = time.perf_counter()
            pick = torch.randint(len(examples), (B,), generator=_gen(cfg.seed, step, 1)).tolist()
            batch = [examples[i] for i in pick][par.prompts(B)]
            ro = engine.generate([x.prompt for x in batch], n=G, max_new_tokens=e.max_new_tokens, stop=e.stop,
                                 seed=par.rollout_seed(_gen(cfg.seed, step, 2)), **sampling)
            timing["time/rollout"] = time.perf_counter() - t0
            # ---- rewards and E4 group advantages ---------------------------------------------------------
            t0 = time.perf_counter()
            scored = score(ro.texts, [x.answer for x in batch for _ in range(G)], fn=reward_fn,
                           timeout=cfg.task.reward_timeout)
            ro, scored = par.gather_rollout(ro, scored, tok.pad_id)  # the global batch, on every rank
            rewards = torch.tensor(scored.rewards, dtype=torch.float32).view(B, G)  # (B, G)
            adv = group_advantages(rewards, a.adv_mode).flatten()  # (N,) prompt-major, like the rollout
            if not torch.isfinite(adv).all():
                raise UserError(f"step {step}: rewards up to {rewards.abs().max().item():.3g} overflow the group "
                                f"advantages (E4) in fp32; scale the reward function {reward_fn!r} down")
            timing["time/rewards"] = time.perf_counter() - t0
            m |= diag.reward_stats(rewards, ro.mask.sum(1), torch.tensor([r == "length" for r in ro.finish_reason]))
            m |= {"reward/errors": scored.n_errors, "reward/timeouts": scored.n_timeouts}
            # ---- θ_old, then the N mini-batch updates (E3, E7, E8) ------------------------------------------
            lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.lr_schedule)
            learned, attempted, skipped = learner.step(step, ro, adv, lr, timing)
            m |= learned
            if abort := monitor.updated(step + 1, attempted, skipped):
                log(step + 1, m)  # the step's row, numbered like every other step's
                if writer is not None:
                    writer.close()
                    plot_run_quietly(run_dir, console.print)  # the curves up to the abort: what a user looks at first
                    write_status(run_dir, "aborted", step + 1, abort)
                raise UserError(f"aborting: {abort}; lower train.lr or check the data (metrics in {metrics_path})")
            # ---- sync the new weights into the engine (cast / quantised to its numerics) -----------------------
            t0 = time.perf_counter()
            engine.sync(model, par.gather)
            timing["time/sync"] = time.perf_counter() - t0
            m |= timing
            m["time/step"] = sum(timing.values())
            m["train/lr"] = lr
            done = step + 1
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                m |= run_eval(done)
            release()  # the step's freed heap back to the OS: glibc keeps it otherwise (issue 31, stablerl.memory)
            m |= step_metrics()  # mem/rss_gib, mem/peak_gib of this process (rank 0's row is logged)
            m = par.broadcast(m)  # rank 0's row (its timings, its eval): every rank then takes the same decisions
            checkpoint, stop = monitor.warn(done, m, console.print)
            oom = over_limit(m, t.max_rss_frac, mem_limit, cfg)  # near the machine's memory: checkpoint and stop
            log(done, m)
            if (t.save_every and done % t.save_every == 0) or done == t.steps or checkpoint or oom:
                save(run_dir, done, model, tok, opt, {"bad_in_row": monitor.bad_in_row}, t.keep_checkpoints, par)
            progress.update(bar, advance=1, info=_line(m))
            if stop:
                console.print(f"[yellow]stopped at step {done} by train.on_warning=stop; the checkpoint of step "
                              f"{done} is in {run_dir / 'checkpoints'}[/yellow]")
                break
            if oom:
                console.print(f"[red]stopped at step {done} (checkpoint in {run_dir / 'checkpoints'}): {oom}[/red]")
                break
    seconds = time.perf_counter() - t_start
    if writer is None:
        return TrainResult(run_dir, done, None, None, seconds)
    writer.close()
    write_status(run_dir, "finished", done, f"stopped by train.on_warning=stop at step {done}" if done < t.steps
                 else f"all {t.steps} steps")
    plot_run_quietly(run_dir, console.print)
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/accuracy" in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    peaks = [r["mem/peak_gib"] for r in rows if "mem/peak_gib" in r]
    return TrainResult(run_dir, done, first.get("eval/accuracy"), last.get("eval/accuracy"), seconds,
                       first.get("eval/mean_length"), last.get("eval/mean_length"), max(peaks, default=None),
                       last.get("step"))


@dataclass
class Monitor:
    """The run's guards and early warnings, and what they decide: abort after train.max_bad_steps steps in a row
    whose updates a NaN/Inf stopped; warnings (stablerl.warning) printed, logged as warn/<signal> and acted on
    (train.on_warning: checkpoint, stop). Rank 0's row decides for every rank (the row is broadcast first)."""

    t: TrainConfig
    watch: Watch
    bad_in_row: int = 0  # steps in a row whose every attempted mini-batch the NaN/Inf guard skipped

    def updated(self, step: int, attempted: int, skipped: int) -> str | None:
        """After step `step`'s updates: why the run must abort, or None."""
        if attempted:  # a step with nothing to update is neither bad nor good: it leaves the count alone
            self.bad_in_row = self.bad_in_row + 1 if skipped == attempted else 0
        if self.bad_in_row >= self.t.max_bad_steps:
            return f"{self.bad_in_row} steps in a row had a NaN/Inf loss or gradient (last at step {step})"
        return None

    def warn(self, step: int, m: dict, say: Callable[[str], None]) -> tuple[bool, bool]:
        """The rules that crossed at `step` (logged into `m`, printed) -> (checkpoint now, stop after it)."""
        fired = self.watch.check(m)
        for rule in fired:
            m[f"warn/{rule.signal}"] = m[rule.signal]
            say(f"[yellow]warning at step {step}: {rule.signal} = {m[rule.signal]:.4g} ({rule}); "
                f"train.on_warning={self.t.on_warning}[/yellow]")
        return bool(fired) and self.t.on_warning in ("checkpoint", "stop"), bool(fired) and self.t.on_warning == "stop"


def write_status(run_dir: Path, status: str, step: int, reason: str) -> None:
    """<run>/status.json, atomically: how the run ended ("finished" | "aborted"), its last step and why (one line);
    the report reads it instead of inferring the end from the metrics and the log."""
    write_text_atomic(run_dir / "status.json", json.dumps({"status": status, "step": step, "reason": reason}) + "\n")


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.AdamW:
    """AdamW over the model's parameters (FSDP's shards once it is wrapped): matrices decay, norms and biases do not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)


def save(run_dir: Path, step: int, model, tok, opt, extra: dict, keep: int, par: Parallel) -> None:
    """A checkpoint of this step. Distributed: the ranks write the optimizer state (DCP), rank 0 the HF weights and
    the trainer state, then moves the optimizer's directory in, all in the one atomic rename of save_checkpoint."""
    if not par.active:
        save_checkpoint(run_dir, step, model, tok, opt, extra, keep)
        return
    staged = par.save_optimizer(run_dir, step, model, opt)
    full = par.full_model(model)  # a collective under FSDP; the whole model on rank 0 only
    if par.main:
        save_checkpoint(run_dir, step, full, tok, None, extra | {"world_size": par.world}, keep,
                        sharded_optimizer=staged)
    par.barrier()


@dataclass(frozen=True)
class Learner:
    """What one global step learns from a scored rollout: `logp_old` and its routes at θ_old (E3, E7), then the N
    mini-batch updates (E8) of the registered loss (E5/E6), and their diagnostics. Every rank of a distributed job
    calls `step` with the same global batch and computes only its share of the rows (stablerl.distributed)."""

    cfg: Config
    model: torch.nn.Module  # the model (FSDP: the sharded module itself; DDP: the module inside the wrapper)
    forward: Callable[..., PolicyLogProbs]  # the differentiated forward (Parallel.wrap)
    opt: torch.optim.Optimizer
    pad_id: int
    device: torch.device
    par: Parallel

    def step(self, step: int, ro: Rollout, adv: torch.Tensor, lr: float, timing: dict) -> tuple[dict, int, int]:
        """(metrics, mini-batches attempted, of those skipped by the NaN/Inf guard) of step `step` on the global
        rollout `ro` with advantages `adv` (N,) at learning rate `lr`; the optimizer has stepped. Adds its phases'
        seconds to `timing`."""
        model, par, opt, t, a = self.model, self.par, self.opt, self.cfg.train, self.cfg.algo
        t0 = time.perf_counter()
        batch = Batch.of(ro, adv, self.pad_id, self.device, model.is_moe)
        micro = t.micro_batch_size or rows_per_pass(model.config, batch.packed.ids.shape[1], t.activation_gib,
                                                    t.activation_checkpointing)  # rows per pass, 0 = all
        plan = plan_step(self.cfg, step, batch.adv.cpu(), par, micro)  # E8 mini-batches, Â = 0 rows, FSDP padding
        update = Update.of(self.cfg, model, batch, self.forward, par)
        # θ_old (E3, E7) in a pass of its own: every row off-policy; on-policy only the rows no update runs (the
        # update's forward gives the others: θ = θ_old at the only update)
        with update.autocast():
            old = old_policy(model, batch.packed, plan.old_micro, batch.routes_infer if a.replay == "R3" else None,
                             update.lp_args, plan.old_pad)
        if not plan.on_policy:
            old = par.sum_rows(old)  # each row was computed by one rank: the global logp_old, routes and entropy
            update = update.at_old(old)  # the support guard at θ_old, before any update
        timing["time/old_logprobs"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr
        # E9 needs the gradients of whole parameters: FSDP holds shards (docs/scaling.md), so no probe there
        probe = bool(t.fidelity_every) and (step + 1) % t.fidelity_every == 0 and par.kind != "fsdp"
        every = t.fidelity_minibatches == "all"  # E9 at each mini-batch (logged per j), else at the most stale one
        cross = route_probe(model, batch.packed, plan.order, t.cross_step_rows, update.autocast)  # θ_{t-1}'s routes
        stats, fids, attempted, skipped, ent_live = [], {}, 0, 0, 0.0
        for j, mb in enumerate(plan.batches):
            if not mb.passes:
                continue  # every row of this mini-batch has Â = 0: no gradient, so no optimizer step
            attempted += 1
            st, fid, ent = update.run(mb, stale=j > 0, probe=probe and (every or j == t.n_minibatches - 1),
                                      fill=old if plan.on_policy else None)
            ent_live += ent
            fids |= {f"{k}/mb{j}": v for k, v in fid.items()} if every and t.n_minibatches > 1 else {}
            fids |= fid if j == t.n_minibatches - 1 else {}
            gnorm = par.grad_norm(model.parameters(), t.grad_clip)
            if st is None or not (math.isfinite(st["loss/policy"]) and torch.isfinite(gnorm)):
                skipped += 1  # guard: a NaN/Inf step (or one with nothing left to learn from) never moves weights
            else:
                opt.step()
                stats.append(st | {"grad/norm": float(gnorm)})
            opt.zero_grad(set_to_none=True)
        timing["time/updates"] = time.perf_counter() - t0
        if plan.on_policy:  # the live rows' θ_old came from the update's forward
            old = par.sum_rows(replace(old, entropy_sum=ent_live + plan.rest_scale * old.entropy_sum))
        m = diagnose(batch, old, plan.weight, a.replay != "R3") | fids
        m |= route_drift(model, cross, update.autocast)
        return m | _mean_dicts(stats) | {"guard/skipped_minibatches": skipped}, attempted, skipped


@dataclass(frozen=True)
class Batch:
    """One step's global batch as the trainer reads it, on the trainer's device."""

    packed: Packed
    logp_infer: torch.Tensor  # (N, T) log μ_θold, 0 off the mask
    routes_infer: torch.Tensor | None  # (N, S, L, K) the engine's experts (MoE)
    adv: torch.Tensor  # (N,)
    tok_mask: torch.Tensor  # (N, S) real tokens

    @classmethod
    def of(cls, ro: Rollout, adv: torch.Tensor, pad_id: int, device: torch.device, is_moe: bool) -> Batch:
        packed = pack(ro.prompt_ids, [row[msk].tolist() for row, msk in zip(ro.tokens, ro.mask)], pad_id).to(device)
        logp_infer = ro.logp_infer[:, : packed.mask.shape[1]].to(device).masked_fill(~packed.mask, 0.0)  # (N, T)
        routes = full_routes(ro, packed) if is_moe else None  # (N, S, L, K)
        return cls(packed, logp_infer, routes, adv.to(device), seq_token_mask(packed))


@dataclass(frozen=True)
class Plan:
    """Which rows run where in one step: the E8 mini-batches (each rank's share of their live rows, and the padding
    passes that keep the ranks' collectives paired), and the rows θ_old needs a pass of its own for."""

    order: torch.Tensor  # (N,) the step's row permutation (E8 split, cross-step probe rows)
    batches: list[MiniBatch]
    on_policy: bool  # N = 1 without truncation: the update's own forward gives θ_old of the rows it trains on
    old_micro: list[torch.Tensor]  # this rank's micro-batches of the θ_old pass
    old_pad: int  # FSDP: more no-grad forwards, so every rank runs as many as the busiest one
    weight: torch.Tensor | None  # (N,) row weights of the diagnostics when Â = 0 rows are subsampled, 0 = unscored
    rest_scale: float = 1.0  # the weight of each scored row with Â = 0 (rows with Â = 0 / rows scored)


def plan_step(cfg: Config, step: int, adv: torch.Tensor, par: Parallel, micro: int) -> Plan:
    """The step's plan. The E8 split is drawn over global row ids (the same on every rank) and fixed before θ_old is
    evaluated: logp_old is computed on exactly the micro-batches (rows, order, padding) the updates will see, so at
    N = 1 the update's forward repeats θ_old's bitwise (r == 1). Rows with Â = 0 get no update (when the loss says
    so) but are scored for the diagnostics: on-policy a uniform draw of train.diag_rows of them, weighted. `micro`:
    rows per forward/backward (0 = all)."""
    t, e = cfg.train, cfg.engine
    N = adv.shape[0]
    order = torch.randperm(N, generator=_gen(cfg.seed, step, 3)).view(t.n_minibatches, -1)  # (N_mb, N/N_mb)
    batches, rest = minibatches(order, adv, skips_zero_adv(cfg.algo.loss), micro, par)
    # with top-p/top-k a sampled token may lie outside the trainer's support (log π_old = -inf): E5's normaliser
    # counts only the kept tokens, so every row's support must be known before the first backward
    on_policy = t.n_minibatches == 1 and e.top_p == 1 and e.top_k == 0
    weight, scale = None, 1.0
    if on_policy and 0 < t.diag_rows < len(rest):
        pick = torch.randperm(len(rest), generator=_gen(cfg.seed, step, 4))[: t.diag_rows].sort().values
        weight = torch.ones(N)
        weight[rest] = 0.0
        scale = len(rest) / t.diag_rows  # each scored row stands for len(rest) / k rows
        weight[rest[pick]] = scale
        rest = rest[pick]
    rest_micro = [r for r in par.share(rest).split(micro or len(rest) or 1) if len(r)]
    old_micro = rest_micro if on_policy else [r for mb in batches for r in mb.micro] + rest_micro
    pad = par.max_int(len(old_micro)) - len(old_micro) if par.lockstep else 0  # FSDP: each forward all-gathers
    return Plan(order.flatten(), batches, on_policy, old_micro, pad, weight, scale)


def diagnose(batch: Batch, old: PolicyLogProbs, weight: torch.Tensor | None, infer_vs_train: bool) -> dict:
    """Diagnostics of θ_old against the sampler (E3) over the scored rows: outside-support fraction, entropy, the
    train-inference KL and (no R3) the routing agreement. `weight` (N,): rows with Â = 0 subsampled (train.diag_rows):
    each scored one weighted so token means keep their meaning (unscored rows: 0); None = every row, once."""
    w = None if weight is None else weight.to(batch.adv.device)  # (N,)
    mask = batch.packed.mask if w is None else batch.packed.mask & (w > 0)[:, None]  # (N, T) the scored rows' tokens
    outside = mask & ~torch.isfinite(old.logp)  # (N, T) sampled, yet outside θ_old's truncated support
    kept = mask & ~outside
    tokens = mask.sum(1) if w is None else mask.sum(1) * w  # (N,)
    m = {"guard/outside_support_frac": float(outside.sum() if w is None else (outside.sum(1) * w).sum())
         / max(1, float(tokens.sum())),
         "entropy/mean": old.entropy_sum / max(1.0, float(tokens.sum()))}
    m |= diag.train_inference_kl(old.logp.masked_fill(~kept, 0.0), batch.logp_infer, kept, weight=w)
    if infer_vs_train:
        tok_mask = batch.tok_mask if w is None else batch.tok_mask & (w > 0)[:, None]
        m |= diag.routing_agreement(batch.routes_infer, old.routes, tok_mask, "route/infer_vs_train", weight=w)
    return m


def clear_run(run_dir: Path, allowed: bool) -> None:
    """Make `run_dir` ready for a run from step 0: an earlier run's files (metrics, samples, TensorBoard events,
    checkpoints, curves) are deleted when `allowed`, else UserError; so no file of the new run mixes with the old."""
    old = [run_dir / n for n in ("metrics.jsonl", "samples.jsonl", "tb", "checkpoints", "curves.png")]
    old = [p for p in old if p.exists()]
    if not old:
        return
    if not allowed:
        ckpts = len(list_checkpoints(run_dir))
        raise UserError(f"{run_dir}: holds an earlier run ({ckpts} checkpoint(s), {', '.join(p.name for p in old)}); "
                        "--resume continues it, --overwrite starts it over (deleting those), or choose another "
                        "name=...")
    for p in old:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def resume_point(run_dir: Path, console: Console) -> tuple[Path, object, object, dict] | None:
    """(checkpoint, model, tokenizer, trainer state) of the newest checkpoint that loads, or None when there is none.
    A corrupt or unreadable one is reported and the one before it is used; if none loads, UserError."""
    found = list_checkpoints(run_dir)
    for ckpt in reversed(found):
        try:
            return (ckpt, *get_model(ckpt), load_trainer_state(ckpt))
        except UserError as err:
            console.print(f"[yellow]--resume: {ckpt.name} is unreadable, trying the one before it: {err}[/yellow]")
    if found:
        raise UserError(f"--resume: none of the {len(found)} checkpoints in {run_dir / 'checkpoints'} loads (see the "
                        "warnings above); start a new run with another name=...")
    return None


@dataclass(frozen=True)
class RouteProbe:
    """Rows of the batch whose expert choices are compared across steps."""

    ids: torch.Tensor  # (n, S)
    mask_seq: torch.Tensor  # (n, S) real tokens

    @classmethod
    def of(cls, packed: Packed, rows: torch.Tensor) -> RouteProbe:
        sub = select(packed, rows)
        return cls(sub.ids, seq_token_mask(sub))


@torch.no_grad()
def expert_routes(model, probe: RouteProbe) -> torch.Tensor:
    """(n, S, L, K) the experts the model's own routers choose for the probe's tokens (no LM head)."""
    return model(probe.ids, logits=False).routes


def route_probe(model, packed: Packed, order: torch.Tensor, rows: int, autocast) -> tuple | None:
    """Cross-step routing (θ_{t-1} vs θ_t, the router's own choice, same tokens): the routing flip that preceded the
    quickstart's step-31 collapse (docs/log.md 2026-12-01). On the step's first `rows` rows (a random subset): two
    no-grad forwards without the LM head, a few % of a step (every rank runs the same ones: FSDP's forwards gather).
    -> (probe, θ_{t-1}'s routes), taken before the updates, or None (dense model, or off)."""
    if not model.is_moe or not rows:
        return None
    sub = RouteProbe.of(packed, order[:rows].to(packed.ids.device))
    with autocast():
        return sub, expert_routes(model, sub)


def route_drift(model, cross: tuple | None, autocast) -> dict:
    """route/cross_step/*: θ_t's routes (after the updates) of the rows `route_probe` routed before them."""
    if cross is None:
        return {}
    with autocast():
        now = expert_routes(model, cross[0])
    return diag.routing_agreement(cross[1], now, cross[0].mask_seq, "route/cross_step")


@dataclass(frozen=True)
class MiniBatch:
    """One E8 mini-batch: all its rows (they set the loss's normalisation) and the micro-batches that are run."""

    idx: torch.Tensor  # (n_mb,) every row of the mini-batch
    micro: list[torch.Tensor]  # row sets, one forward + backward each; rows with Â = 0 left out when the loss allows
    # Distributed (stablerl.distributed): `micro` holds this rank's share of the live rows; every rank runs `passes`
    # forward + backward passes (the busiest rank's micro-batch count), so their gradient collectives pair up; a rank
    # with fewer pads with passes of weight 0 on `lead`. One process: passes == len(micro).
    passes: int = 0
    lead: torch.Tensor | None = None  # (≤1,) the mini-batch's first live row
    first: torch.Tensor | None = None  # the rows of one process's first micro-batch: E9's probe rows


def minibatches(order: torch.Tensor, adv: torch.Tensor, skip_zero_adv: bool, micro_size: int,
                par: Parallel | None = None) -> tuple[list[MiniBatch], torch.Tensor]:
    """The E8 mini-batches of `order` (N_mb, n_mb), each split into micro-batches of `micro_size` rows (0 = one), and
    the rows no update runs. Rows with Â = 0 (groups whose rewards all agree: 30-75% on the default task) have no
    gradient under a loss that declares so (`algorithm.skips_zero_adv`): they are left out, and the normalisation
    still counts them (MiniBatch.idx). With `par`, the micro-batches are those of this rank's share of the live rows."""
    world = 1 if par is None else par.world
    out, rest = [], []
    for idx in order:
        run = adv[idx] != 0 if skip_zero_adv else torch.ones_like(idx, dtype=torch.bool)  # (n_mb,)
        rows = idx[run]
        rest.append(idx[~run])
        mine = rows if par is None else par.share(rows)
        widest = -(-len(rows) // world)  # the largest share (tensor_split gives the first ranks one more row)
        passes = -(-widest // micro_size) if micro_size else int(widest > 0)
        out.append(MiniBatch(idx, list(mine.split(micro_size or max(1, len(mine)))) if len(mine) else [], passes,
                             rows[:1], rows[: micro_size or len(rows)]))
    return out, torch.cat(rest)


def old_policy(model, packed: Packed, micro: list[torch.Tensor], replay: torch.Tensor | None, lp_args: dict,
               pad: int = 0) -> PolicyLogProbs:
    """θ_old over micro-batches of rows, no grad -> logp_old (N, T), the routes (N, S, L, K) or None, and the summed
    entropy of the sampling distribution over their response tokens; rows not in `micro` stay 0. Distributed,
    `micro` is this rank's part and `pad` more forwards, whose results are dropped, keep FSDP's collectives in step."""
    N, T = packed.mask.shape
    logp = torch.zeros(N, T, device=packed.ids.device)  # (N, T)
    routes, ent = None, 0.0
    if model.is_moe:  # (N, S, L, K) in the engine's compact route dtype
        c = model.config
        routes = torch.zeros(N, packed.ids.shape[1], len(c.moe_layers), c.num_experts_per_tok,
                             dtype=route_dtype(c.num_experts), device=logp.device)
    pads = [torch.zeros(1, dtype=torch.long, device=logp.device)] * pad
    with torch.no_grad():
        for k, idx in enumerate(micro + pads):
            mb = select(packed, idx)
            S = mb.ids.shape[1]
            out = policy_logprobs(model, mb, None if replay is None else replay[idx, :S], entropy=True, **lp_args)
            if k >= len(micro):
                continue  # a padding pass
            logp[idx, : mb.mask.shape[1]] = out.logp
            ent += out.entropy_sum
            if routes is not None:
                routes[idx, :S] = out.routes.to(routes.dtype)
    return PolicyLogProbs(logp, routes, ent)


@dataclass(frozen=True)
class Update:
    """E8 mini-batch updates of one step: the E5/E6 loss over a mini-batch's micro-batches with gradients accumulated
    (exact: each micro-batch is normalised by the whole mini-batch's sizes), plus the E9 probe. The caller clips the
    gradient and steps the optimizer. Distributed, this rank's micro-batches; the sizes and stats stay global."""

    model: torch.nn.Module
    batch: Batch
    logp_old: torch.Tensor | None  # (N, T) θ_old's log-probs; None on-policy (the update's forward gives them)
    routes_old: torch.Tensor | None  # (N, S, L, K) θ_old's experts (R2 replays them; else old-vs-current routing)
    replay: str  # E7: whose experts the update runs (none | R2 | R3)
    loss: str
    hp: dict  # LossHP fields
    lp_args: dict  # policy_logprobs' sampling, chunk and checkpoint arguments
    truncated: bool  # top-p/top-k sampling: a moved policy may drop a sampled token from its support
    autocast: Callable  # () -> the context the forward runs in (bf16 autocast or nothing)
    forward: Callable[..., PolicyLogProbs]  # the differentiated forward (packed, routes, **lp_args) (DDP's)
    par: Parallel = field(default_factory=Parallel)  # one process unless given

    @classmethod
    def of(cls, cfg: Config, model, batch: Batch, forward: Callable | None = None, par: Parallel | None = None):
        e, t = cfg.engine, cfg.train
        lp_args = dict(temperature=e.temperature, top_p=e.top_p, top_k=e.top_k, chunk=t.logit_chunk,
                       checkpoint=t.activation_checkpointing)
        autocast = partial(torch.autocast, batch.adv.device.type, dtype=torch.bfloat16, enabled=t.dtype == "bf16")
        return cls(model, batch, None, None, cfg.algo.replay, cfg.algo.loss, loss_hp(cfg), lp_args,
                   e.top_p < 1 or e.top_k > 0, autocast, forward or partial(policy_logprobs, model), par or Parallel())

    def at_old(self, old: PolicyLogProbs) -> Update:
        """With θ_old known: the support guard. A token the engine sampled can lie outside the trainer's truncated
        support (top-p/top-k with a non-fp32 engine): log π_old = -inf there; it is dropped from the loss."""
        packed = self.batch.packed
        packed = replace(packed, mask=packed.mask & torch.isfinite(old.logp))
        return replace(self, batch=replace(self.batch, packed=packed), routes_old=old.routes,
                       logp_old=old.logp.masked_fill(~packed.mask, 0.0))

    def run(self, mb: MiniBatch, stale: bool, probe: bool,
            fill: PolicyLogProbs | None = None) -> tuple[dict | None, dict, float]:
        """(stats, E9 stats, entropy sum) after the backward passes; stats None when no token was left to learn from.
        `fill`: on-policy (θ = θ_old at the only update), θ_old's buffers: this forward's detached log-probs and
        routes are written there and are logp_old (r == 1 exactly), and its entropy is returned."""
        par, packed, b = self.par, self.batch.packed, self.batch
        # The loss divides by the mini-batch's token counts. They are mask's, unless the moved policy (a later
        # mini-batch, with truncation) dropped tokens: then they must be known before the first backward.
        size, keeps = BatchSize.of(packed.mask[mb.idx]), None
        if stale and self.truncated:
            keeps = self._supported(mb)
            size = minibatch_size(packed.mask, mb.idx, mb.micro, keeps, par)
        stats, fid, ent = [], {}, 0.0
        passes = mb.passes if par.active else len(mb.micro)
        for k in range(passes):
            mine = k < len(mb.micro)  # else a pass of weight 0 that keeps the ranks' collectives paired
            rows = mb.micro[k] if mine else mb.lead
            with par.accumulate(last=k == passes - 1):  # DDP: no_sync around forward and backward but the last
                sub = select(packed, rows)
                S, T = sub.ids.shape[1], sub.mask.shape[1]  # trimmed to these rows' longest sequence / response
                with self.autocast():
                    cur = self.forward(sub, self._replay(rows, S), entropy=fill is not None, **self.lp_args)
                logp = cur.logp  # (n, T) log π_θ under the support rule of logp_old
                if fill is not None and mine:
                    fill.logp[rows, :T] = logp.detach()
                    if fill.routes is not None:
                        fill.routes[rows, :S] = cur.routes.to(fill.routes.dtype)
                    ent += cur.entropy_sum
                logp_old = logp.detach() if fill is not None else self.logp_old[rows, :T]  # (n, T)
                # Without truncation every log π is finite, and a NaN must reach the loss (and the NaN guard)
                keep = keeps[k] if keeps is not None and mine else sub.mask  # (n, T)
                live = mine and bool(keep.any())
                if not live and not par.active:
                    continue
                if probe and k == 0:
                    fid = self._probe(mb, rows, sub, logp, keep, live)
                if live:
                    out = policy_loss(self.loss, logp, logp_old, b.logp_infer[rows, :T], b.adv[rows], keep,
                                      batch=size, **self.hp)
                    # ×P: the ranks' gradients are averaged, and each loss is normalised by the global mini-batch
                    (out.loss * par.loss_scale() if par.active else out.loss).backward()
                else:
                    # weight 0 on rows a live pass runs too (the mini-batch's lead row): this rank joins the
                    # gradient collective and touches no parameter the live rows do not (Adam skips grad=None)
                    (logp.masked_fill(~torch.isfinite(logp.detach()), 0.0) * 0.0).sum().backward()
            if not live:
                continue
            st = {**out.stats, "loss/policy": float(out.loss.detach())}
            if stale and self.replay == "none" and cur.routes is not None:  # at θ_old itself: 1 by construction
                st |= diag.routing_agreement(self.routes_old[rows, :S], cur.routes, b.tok_mask[rows, :S],
                                             "route/old_vs_current")
            stats.append(st)
        if par.active:  # every rank's micro-batch stats, merged as one process merges its micro-batches'
            stats = [st for part in par.gather_objects(stats) for st in part]
        return (_merge_micro(stats) if stats else None), fid, ent

    def _probe(self, mb: MiniBatch, rows: torch.Tensor, sub: Packed, logp: torch.Tensor, keep: torch.Tensor,
               live: bool) -> dict:
        """E9 on a probed mini-batch (the most stale one, or each: train.fidelity_minibatches), on its first
        micro-batch, at the weights its update sees: w = π/μ_old holds exactly the discrepancy and staleness this
        gradient is computed under. Rows with Â = 0 add nothing to either gradient, so the live rows give the cosine
        of the rows they belong to. Distributed: the same rows (a prefix of each rank's first micro-batch), gradients
        summed."""
        par, T = self.par, logp.shape[1]
        sel = torch.isin(rows, mb.first) & live if par.active else torch.ones_like(rows, dtype=torch.bool)  # (n,)
        # With Routing Replay (E7) the update differentiates the replayed policy: the probe rows are run once more
        # under the router's own choice, for the true objective's g_seq (the replay's bias). Also for R2's first
        # mini-batch, where both are π_θ: a check that costs one forward every k steps.
        own = None
        if self.replay != "none" and bool(sel.any()):
            with self.autocast():  # the bare model: a gradient taken, never accumulated (no DDP hook)
                own = policy_logprobs(self.model, sub, None, **self.lp_args).logp[sel]  # (n_probe, T)
        elif self.replay != "none":  # no probe rows on this rank: it still joins E9's collectives
            own = logp.new_zeros(0, T)
        return diag.fidelity(logp[sel], self.batch.logp_infer[rows, :T][sel], self.batch.adv[rows][sel], keep[sel],
                             list(self.model.parameters()), retain_graph=True,
                             reduce=par.reduce if par.active else None, logp_own=own,
                             mask_own=sub.mask[sel] if own is not None else None)

    def _replay(self, rows: torch.Tensor, S: int) -> torch.Tensor | None:
        """E7: the experts the update runs. R2 on-policy: θ_old's own choice is the router's, so none to replay."""
        routes = {"none": None, "R2": self.routes_old, "R3": self.batch.routes_infer}[self.replay]
        return None if routes is None else routes[rows, :S]

    def _supported(self, mb: MiniBatch) -> list[torch.Tensor]:
        """The tokens of each micro-batch that the current policy still supports: the support guard of a stale
        mini-batch with truncated sampling, a no-grad look ahead before its first backward."""
        out = []
        passes = mb.passes if self.par.lockstep else len(mb.micro)  # FSDP: as many forwards on every rank
        with torch.no_grad(), self.autocast():
            for k in range(passes):
                rows = mb.micro[k] if k < len(mb.micro) else mb.lead
                sub = select(self.batch.packed, rows)
                lp = policy_logprobs(self.model, sub, self._replay(rows, sub.ids.shape[1]), **self.lp_args).logp
                if k < len(mb.micro):
                    out.append(sub.mask & torch.isfinite(lp))
        return out


def minibatch_size(mask: torch.Tensor, idx: torch.Tensor, micro: list[torch.Tensor],
                   keeps: list[torch.Tensor], par: Parallel | None = None) -> BatchSize:
    """E5/E6 normalisation sizes of mini-batch `idx` (N_mb,): all its rows (those with Â = 0 too), counting only the
    tokens the loss sums over. `mask` (N, T) holds every row's tokens; `keeps[k]` (n_k, t_k) those of the rows
    `micro[k]` that the moved policy still supports (with top-p/top-k it may drop a sampled token)."""
    kept = mask.clone()  # (N, T)
    for rows, keep in zip(micro, keeps):
        kept[rows] = False
        kept[rows, : keep.shape[1]] = keep
    if par is not None and par.active:  # each rank knows its own rows' drops: a token is kept if no rank dropped it
        kept = mask & ~par.all_sum(mask & ~kept)
    return BatchSize.of(kept[idx])


def _merge_micro(stats: list[dict]) -> dict:
    """One mini-batch's stats from its micro-batches': the loss is their sum (each is normalised by the whole
    mini-batch), extremes are extremes, and the rest are token-weighted means (exact for token fractions)."""
    if len(stats) == 1:
        return stats[0]
    w = [s.get("loss/tokens", 1.0) for s in stats]
    out = {}
    for k in {k for s in stats for k in s}:
        vals = [(s[k], wi) for s, wi in zip(stats, w) if k in s]
        if k in ("loss/policy", "loss/tokens"):
            out[k] = sum(v for v, _ in vals)
        elif k.endswith("_max"):
            out[k] = max(v for v, _ in vals)
        elif k.endswith("_min"):
            out[k] = min(v for v, _ in vals)
        else:
            out[k] = sum(v * wi for v, wi in vals) / max(1e-12, sum(wi for _, wi in vals))
    return out


def _mean_dicts(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r})
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if finite(r.get(k)) is not None]
        if vals:
            out[k] = max(vals) if k.endswith("_max") else min(vals) if k.endswith("_min") else sum(vals) / len(vals)
    return out


def _line(m: dict) -> str:
    """The compact per-step console line."""
    parts = [f"reward {m.get('reward/mean', float('nan')):.3f}", f"len {m.get('length/mean', 0):.1f}",
             f"kl {m.get('kl/k3', float('nan')):.1e}", f"ent {m.get('entropy/mean', float('nan')):.2f}",
             f"clip {m.get('clip/frac', 0):.3f}", f"{m.get('time/step', 0):.1f}s"]
    if "eval/accuracy" in m:
        parts.append(f"eval {m['eval/accuracy']:.1%}")
    if "mem/rss_gib" in m:
        parts.append(f"rss {m['mem/rss_gib']:.1f}G (peak {m['mem/peak_gib']:.1f}G)")
    return "  ".join(parts)
