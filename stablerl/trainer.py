"""The RL loop (DESIGN §2 trainer, E4–E9), visible in one function: `train(cfg)`.

One global step: sample B prompts × G responses with the inference engine → rewards → group advantages (E4) →
`logp_old` from the training engine at θ_old, recording its routes → N mini-batch updates (E8), each minimising the
registered policy loss (E5/E6) with Routing Replay if asked (E7) → sync weights to the engine → diagnostics → log →
checkpoint. Every random number comes from generators seeded by (seed, step), so a resumed run replays exactly.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from stablerl import diagnostics as diag
from stablerl.algorithm import BatchSize, group_advantages, policy_loss
from stablerl.checkpoint import RunLock, check_resume_config, list_checkpoints, load_trainer_state, save_checkpoint
from stablerl.config import Config, check_replay, load_config, save_config, task_reward
from stablerl.engine import Engine, Rollout
from stablerl.errors import UserError
from stablerl.evaluate import evaluate
from stablerl.hf import get_model
from stablerl.metrics import MetricsWriter, read_metrics, truncate_after
from stablerl.plots import plot_run_quietly
from stablerl.rewards import score
from stablerl.sampling import logprobs_from_logits
from stablerl.sequences import Packed, pack, response_logits, response_logp
from stablerl.sft import DTYPES, lr_at
from stablerl.tasks import task_examples
from stablerl.tokenizer import prompt_tokenizer


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    initial_accuracy: float | None
    final_accuracy: float | None
    seconds: float
    initial_length: float | None = None  # mean greedy response tokens on the held-out set
    final_length: float | None = None


def _gen(seed: int, step: int, salt: int) -> torch.Generator:
    """Independent stream per (seed, step, purpose): resuming at `step` reproduces every draw."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 7919 + salt) % (2**63))


def full_routes(ro: Rollout, packed: Packed) -> torch.Tensor | None:
    """The engine's routes laid out like the training batch (N, S, L, K): prompt then response tokens (R3)."""
    if ro.routes_infer is None:
        return None
    N, S = packed.ids.shape
    L, K = ro.routes_infer.shape[2:]
    out = torch.zeros(N, S, L, K, dtype=torch.long)  # padding rows keep expert 0: their outputs are never read
    for i in range(N):
        p, t = int(packed.prompt_lens[i]), int(packed.resp_lens[i])
        out[i, :p] = ro.prompt_routes[i]
        out[i, p : p + t] = ro.routes_infer[i, :t]
    return out


def seq_token_mask(packed: Packed) -> torch.Tensor:
    """(N, S) True on real (prompt or response) tokens of the packed batch."""
    S = packed.ids.shape[1]
    lengths = packed.prompt_lens + packed.resp_lens
    return torch.arange(S)[None] < lengths[:, None]


def train(cfg: Config, resume: bool = False, show_progress: bool = True, console: Console | None = None) -> TrainResult:
    with RunLock(cfg.run_dir()):  # one writer per run directory
        return _train(cfg, resume, show_progress, console or Console())


def _train(cfg: Config, resume: bool, show_progress: bool, console: Console) -> TrainResult:
    run_dir = cfg.run_dir()
    e, a, t = cfg.engine, cfg.algo, cfg.train
    point = resume_point(run_dir, console) if resume else None
    if resume and point is None:
        console.print(f"[yellow]--resume: no checkpoint in {run_dir}, starting from step 0[/yellow]")
    if point is not None and (run_dir / "config.yaml").exists():  # checked before anything in run_dir is touched
        check_resume_config(load_config(run_dir / "config.yaml"), cfg, run_dir / "config.yaml")
    ckpt, model, tok, state = point or (None, *get_model(cfg.init or cfg.model, seed=cfg.seed), {})
    tok = prompt_tokenizer(tok, cfg.task)  # the chat template, when task.chat_template asks for it
    start = state.get("step", 0)
    check_replay(cfg, model.is_moe)
    save_config(cfg, run_dir / "config.yaml")  # before step 0: the run directory always says how it was made
    model.to(DTYPES[t.dtype]).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; norms and biases do not
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)
    if ckpt is not None:
        opt.load_state_dict(state["optimizer"])
        console.print(f"resuming {run_dir} from {ckpt.name}")
    engine = Engine(model, tok, numerics=e.numerics)  # its own copy of the weights, cast to its numerics
    evaluator = Engine(model, tok, numerics="fp32")  # held-out accuracy of the policy itself, not of its bf16 copy
    examples = task_examples(cfg.task, "train")
    reward_fn = task_reward(cfg.task)
    heldout = task_examples(cfg.task, "heldout")
    # every file of the run directory continues from the resumed step: rows a crashed run wrote after it are dropped
    writer = MetricsWriter(run_dir, resume_step=start if ckpt is not None else None)
    samples_path = run_dir / "samples.jsonl"
    if ckpt is not None:
        truncate_after(samples_path, start)
    elif samples_path.exists():
        samples_path.unlink()
    B, G, N = t.batch_prompts, t.group_size, t.n_minibatches
    hp = dict(eps_low=a.eps_low, eps_high=a.eps_high, max_tokens=e.max_new_tokens, is_rule=a.is_rule,
              is_trunc=a.is_trunc, is_low=a.is_low, is_high=a.is_high)
    sampling = dict(temperature=e.temperature, top_p=e.top_p, top_k=e.top_k)
    bad_in_row = state.get("bad_in_row", 0)
    t_start = time.perf_counter()

    def run_eval(step: int) -> dict[str, float]:
        evaluator.sync(model)
        res = evaluate(evaluator, heldout, e.max_new_tokens, reward=reward_fn, timeout=cfg.task.reward_timeout,
                       seed=cfg.seed, n_samples=t.samples_per_eval)
        with samples_path.open("a") as f:
            for s in res.samples:
                f.write(json.dumps({"step": step, **s}) + "\n")
        return {"eval/accuracy": res.accuracy, "eval/mean_length": res.mean_length}

    if start == 0:
        writer.log(0, run_eval(0))  # the cold start's accuracy: the baseline every later eval is compared with
    progress = Progress(TextColumn("rl"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                        disable=not show_progress)
    with progress:
        bar = progress.add_task("rl", total=t.steps, completed=start, info="")
        for step in range(start, t.steps):
            timing, m = {}, {}
            # ---- rollout: B prompts x G samples from the inference engine (μ_θold) --------------------------
            t0 = time.perf_counter()
            pick = torch.randint(len(examples), (B,), generator=_gen(cfg.seed, step, 1)).tolist()
            batch = [examples[i] for i in pick]
            ro = engine.generate([x.prompt for x in batch], n=G, max_new_tokens=e.max_new_tokens, stop=e.stop,
                                 seed=int(torch.randint(2**31, (1,), generator=_gen(cfg.seed, step, 2))), **sampling)
            timing["time/rollout"] = time.perf_counter() - t0
            # ---- rewards and E4 group advantages ---------------------------------------------------------
            t0 = time.perf_counter()
            scored = score(ro.texts, [x.answer for x in batch for _ in range(G)], fn=reward_fn,
                           timeout=cfg.task.reward_timeout)
            rewards = torch.tensor(scored.rewards, dtype=torch.float32).view(B, G)  # (B, G)
            adv = group_advantages(rewards, a.adv_mode).flatten()  # (N,) prompt-major, like the rollout
            if not torch.isfinite(adv).all():
                raise UserError(f"step {step}: rewards up to {rewards.abs().max().item():.3g} overflow the group "
                                f"advantages (E4) in fp32; scale the reward function {reward_fn!r} down")
            timing["time/rewards"] = time.perf_counter() - t0
            m |= diag.reward_stats(rewards, ro.mask.sum(1), torch.tensor([r == "length" for r in ro.finish_reason]))
            m |= {"reward/errors": scored.n_errors, "reward/timeouts": scored.n_timeouts}
            # ---- θ_old: logp_old and its routes from the training engine (E3, E7) -------------------------
            t0 = time.perf_counter()
            packed = pack(ro.prompt_ids, [row[msk].tolist() for row, msk in zip(ro.tokens, ro.mask)], tok.pad_id)
            logp_infer = ro.logp_infer[:, : packed.mask.shape[1]].masked_fill(~packed.mask, 0.0)  # (N, T) log μ_θold
            routes_infer = full_routes(ro, packed) if model.is_moe else None  # (N, S, L, K)
            # E8 split, fixed before θ_old is evaluated: logp_old is computed on exactly the batches (rows, order,
            # padding) the updates will see, so the first update (which at N = 1 reuses that very forward) has r == 1.
            order = torch.randperm(B * G, generator=_gen(cfg.seed, step, 3)).view(N, -1)  # (N_mb, N/N_mb)
            # Rows with Â = 0 (groups whose rewards all agree: 30-75% on the default task) have no gradient under any
            # registered loss: the updates leave them out (LossHP.batch keeps the whole mini-batch's normalisation)
            # and θ_old scores them in one forward of their own, for the diagnostics only.
            live = [idx[adv[idx] != 0] for idx in order]  # N_mb x (n_j,)
            dead = torch.cat([idx[adv[idx] == 0] for idx in order])  # (N - Σ n_j,)
            replay_old = routes_infer if a.replay == "R3" else None
            # N = 1: the one update runs at θ_old itself, so θ_old's forward of its rows is kept with its graph and the
            # update reuses it instead of repeating it (one forward less per step; r == 1 by construction).
            logp_old, lp_full_old, routes_old, graph = _old_policy(model, packed, [*live, dead], replay_old, sampling,
                                                                   keep_graph=N == 1)
            # A token the engine sampled can lie outside the trainer's truncated support (top-p/top-k with a
            # non-fp32 engine): log π_old = -inf there. Such tokens are dropped from the loss and counted.
            outside = packed.mask & ~torch.isfinite(logp_old)  # (N, T)
            packed = replace(packed, mask=packed.mask & ~outside)
            mask = packed.mask  # (N, T)
            logp_old = logp_old.masked_fill(~mask, 0.0)
            timing["time/old_logprobs"] = time.perf_counter() - t0
            m["guard/outside_support_frac"] = float(outside.sum()) / max(1, int(ro.mask.sum()))
            m |= diag.entropy(lp_full_old, mask)
            m |= diag.train_inference_kl(logp_old, logp_infer, mask)
            tok_mask = seq_token_mask(packed)
            if a.replay != "R3":
                m |= diag.routing_agreement(routes_infer, routes_old, tok_mask, "route/infer_vs_train")
            # ---- E8: N mini-batch updates; later ones are off-policy (staleness r != 1) -------------------
            t0 = time.perf_counter()
            lr = (lr_at(step, t.lr, t.warmup_steps, t.steps) if t.lr_schedule == "cosine"
                  else t.lr * min(1.0, (step + 1) / max(1, t.warmup_steps)))  # linear warmup, then constant
            for group in opt.param_groups:
                group["lr"] = lr
            probe = bool(t.fidelity_every) and (step + 1) % t.fidelity_every == 0
            replay = {"none": None, "R2": routes_old, "R3": routes_infer}[a.replay]  # E7: whose experts run
            mb_stats: list[dict] = []
            attempted = skipped = 0  # mini-batches with rows to update / of those, the ones a guard stopped
            for j, (idx, rows) in enumerate(zip(order, live)):
                if rows.numel() == 0:
                    continue  # every row of this mini-batch has Â = 0: no gradient, so no optimizer step
                attempted += 1
                mb = _select(packed, rows)
                S, T = mb.ids.shape[1], mb.mask.shape[1]  # trimmed to these rows' longest sequence / response
                reused = graph is not None
                if reused:  # N = 1: θ_old's own forward of these rows (R2 would replay its own routes)
                    (logp, cur_routes), graph = graph, None
                    logp = logp.masked_fill(~mb.mask, 0.0)  # (n, T) padding and tokens outside the support: zeroed
                else:
                    cur = model(mb.ids, routes=None if replay is None else replay[rows, :S])
                    logp = response_logp(cur.logits, mb, **sampling)  # (n, T) log π_θ, support rule of logp_old
                    cur_routes = cur.routes
                # with top-p/top-k the moved policy may no longer include a sampled token (log π = -inf): drop it
                keep = mb.mask & torch.isfinite(logp.detach())  # (n, T)
                if not keep.any():
                    skipped += 1  # nothing left to learn from: as bad as a NaN (non-finite weights end up here)
                    continue
                out = policy_loss(a.loss, logp, logp_old[rows, :T], logp_infer[rows, :T], adv[rows], keep,
                                  batch=minibatch_size(mask, idx, rows, keep), **hp)
                if probe and j == N - 1:
                    # E9 on the last (most stale) mini-batch, at the weights its update sees: w = π_θ/μ_θold
                    # holds exactly the discrepancy and staleness this gradient is computed under. Rows with Â = 0
                    # add nothing to either gradient, so the live rows give the whole mini-batch's cosine.
                    m |= diag.fidelity(logp, logp_infer[rows, :T], adv[rows], keep, list(model.parameters()),
                                       retain_graph=True)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                if not (torch.isfinite(out.loss) and torch.isfinite(gnorm)):
                    skipped += 1  # guard: a NaN/Inf step never reaches the weights
                    opt.zero_grad(set_to_none=True)
                    continue
                opt.step()
                st = {**out.stats, "loss/policy": float(out.loss.detach()), "grad/norm": float(gnorm)}
                if a.replay == "none" and cur_routes is not None and not reused:  # reused: agreement 1 by construction
                    st |= diag.routing_agreement(routes_old[rows, :S], cur_routes, tok_mask[rows, :S],
                                                "route/old_vs_current")
                mb_stats.append(st)
            timing["time/updates"] = time.perf_counter() - t0
            m |= _mean_dicts(mb_stats)
            m["guard/skipped_minibatches"] = skipped
            if attempted:  # a step with nothing to update is neither bad nor good: it leaves the count alone
                bad_in_row = bad_in_row + 1 if skipped == attempted else 0
            if bad_in_row >= t.max_bad_steps:
                writer.log(step + 1, m)  # the step's row, numbered like every other step's
                writer.close()
                plot_run_quietly(run_dir, console.print)  # the curves up to the abort are what a user looks at first
                raise UserError(f"aborting: {bad_in_row} steps in a row had a NaN/Inf loss or gradient (last at step "
                                f"{step + 1}); lower train.lr or check the data (metrics in {writer.path})")
            # ---- sync the new weights into the engine (cast / quantised to its numerics) -----------------------
            t0 = time.perf_counter()
            engine.sync(model)
            timing["time/sync"] = time.perf_counter() - t0
            m |= timing
            m["time/step"] = sum(timing.values())
            m["train/lr"] = lr
            done = step + 1
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                m |= run_eval(done)
            writer.log(done, m)
            if (t.save_every and done % t.save_every == 0) or done == t.steps:
                save_checkpoint(run_dir, done, model, tok, opt, {"bad_in_row": bad_in_row}, t.keep_checkpoints)
            progress.update(bar, advance=1, info=_line(m))
    writer.close()
    plot_run_quietly(run_dir, console.print)
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/accuracy" in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    return TrainResult(run_dir, t.steps, first.get("eval/accuracy"), last.get("eval/accuracy"),
                       time.perf_counter() - t_start, first.get("eval/mean_length"), last.get("eval/mean_length"))


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


def _old_policy(model, packed: Packed, batches: list[torch.Tensor], replay: torch.Tensor | None, sampling: dict,
                keep_graph: bool = False):
    """θ_old forward per batch of row indices (together a partition of the rows) -> logp_old (N, T), full log-probs
    (N, T, V), routes (N, S, L, K) or None, and `graph`: with keep_graph, the first batch's forward is run with grad
    and returned as (logp (n, t) with grad, its routes) for an update at these same weights to reuse; else None."""
    N, T = packed.mask.shape
    logp_old = torch.zeros(N, T)  # (N, T)
    lp_full = torch.zeros(N, T, model.config.vocab_size)  # (N, T, V)
    routes, graph = None, None
    for i, idx in enumerate(batches):
        if idx.numel() == 0:
            continue
        mb = _select(packed, idx)
        S, t = mb.ids.shape[1], mb.mask.shape[1]
        with torch.set_grad_enabled(keep_graph and i == 0):
            out = model(mb.ids, routes=None if replay is None else replay[idx, :S])
            lp = logprobs_from_logits(response_logits(out.logits, mb), **sampling)  # (n, t, V)
            logp = lp.gather(-1, mb.targets[..., None]).squeeze(-1)  # (n, t)
        if logp.requires_grad:
            graph = (logp, out.routes)  # the update masks it, as response_logp would
        lp_full[idx, :t] = lp.detach()
        logp_old[idx, :t] = logp.detach()
        if out.routes is not None:
            if routes is None:
                routes = torch.zeros(N, packed.ids.shape[1], *out.routes.shape[2:], dtype=torch.long)
            routes[idx, :S] = out.routes
    return logp_old, lp_full, routes, graph


def minibatch_size(mask: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor) -> BatchSize:
    """E5/E6 normalisation sizes of mini-batch `idx` (N_mb,): all its rows (those with Â = 0 too), counting only the
    tokens the loss sums over. `mask` (N, T) holds every row's tokens; `keep` (n, t) those of the live `rows` (n,)
    that the moved policy still supports (with top-p/top-k it may drop a sampled token)."""
    kept = mask.clone()  # (N, T)
    kept[rows] = False
    kept[rows, : keep.shape[1]] = keep
    return BatchSize.of(kept[idx])


def _select(p: Packed, idx: torch.Tensor) -> Packed:
    """Rows `idx` of a packed batch, trimmed to their own longest sequence (less compute per mini-batch)."""
    S = int((p.prompt_lens[idx] + p.resp_lens[idx]).max())
    T = max(1, int(p.resp_lens[idx].max()))
    return Packed(p.ids[idx, :S], p.resp_pos[idx, :T].clamp(max=S - 1), p.targets[idx, :T], p.mask[idx, :T],
                  p.prompt_lens[idx], p.resp_lens[idx])


def _mean_dicts(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r})
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r and isinstance(r[k], int | float) and math.isfinite(r[k])]
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
    return "  ".join(parts)
