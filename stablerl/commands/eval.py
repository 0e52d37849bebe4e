"""`stablerl eval`: greedy accuracy and mean@k of a model on a task's held-out split or a data file."""

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stablerl.config import TaskConfig, task_reward
from stablerl.errors import UserError


def add_arguments(p):
    p.add_argument("--model", required=True, help="checkpoint directory, preset or hub id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default="arith", help="built-in task name (held-out split)")
    src.add_argument("--data", default=None, help="JSONL / Parquet / CSV file of {prompt, answer} records")
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--answer-key", default="answer")
    p.add_argument("--chat-template", action="store_true",
                   help="render prompts with the checkpoint's chat template (as transformers' apply_chat_template)")
    p.add_argument("--system-prompt", default=None, help="system message for --chat-template")
    p.add_argument("--n", type=int, default=None, help="evaluate only the first n examples")
    p.add_argument("--k", type=int, default=0, help="also sample k answers per prompt at temperature 1 (mean@k)")
    p.add_argument("--numerics", default="fp32", choices=["fp32", "bf16", "fp16", "fp8"])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reward", default=None, help="reward function name or package.module:function "
                   "(default: the task's own; math for data files)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the results as JSON here")


def run(args) -> int:
    from stablerl.engine import Engine
    from stablerl.evaluate import evaluate
    from stablerl.hf import get_model
    from stablerl.tasks import task_examples
    from stablerl.tokenizer import prompt_tokenizer

    if args.system_prompt is not None and not args.chat_template:
        raise UserError("--system-prompt: needs --chat-template (the system prompt is a message of the chat template)")
    task = TaskConfig(name=args.task or "arith", heldout_data=args.data, prompt_key=args.prompt_key,
                      answer_key=args.answer_key, chat_template=args.chat_template, system_prompt=args.system_prompt)
    examples = task_examples(task, "heldout")[: args.n]
    model, tok = get_model(args.model, seed=args.seed)
    engine = Engine(model.eval(), prompt_tokenizer(tok, task), numerics=args.numerics)
    reward = args.reward or task_reward(task)
    res = evaluate(engine, examples, args.max_new_tokens, k=args.k, reward=reward, seed=args.seed)
    table = Table(title=f"eval {args.model} on {args.data or args.task}")
    for col in ("n", "greedy accuracy", f"mean@{args.k}" if args.k else "mean@k", "mean length"):
        table.add_column(col, justify="right")
    table.add_row(str(res.n), f"{res.accuracy:.1%}", "-" if res.mean_at_k is None else f"{res.mean_at_k:.1%}",
                  f"{res.mean_length:.1f}")
    Console().print(table)
    out = {"model": str(args.model), "source": args.data or args.task, "numerics": args.numerics, **res.as_dict(),
           "samples": res.samples}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
    return 0
