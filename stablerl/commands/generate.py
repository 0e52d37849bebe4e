"""`stablerl generate`: sample completions with the inference engine and write them as JSONL.

Input: a JSONL file, one object per line with a string field `prompt` (blank lines are skipped). Every line is
read and checked (JSON, field, length against the model context) before anything is generated, so a bad line
stops the run with `FILE:LINE: ...` and no partial output. Output: one JSON object per sample, prompt-major
(the n samples of a prompt are consecutive), to `--output` or stdout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from stablerl.errors import UserError


def add_arguments(p):
    p.add_argument("--model", default="tiny-moe",
                   help="checkpoint directory, hub id or preset (presets are built from seed 0)")
    p.add_argument("--prompts", required=True, help="JSONL file, one {\"prompt\": ...} object per line")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus truncation (1 = none)")
    p.add_argument("--top-k", type=int, default=0, help="top-k truncation (0 = none)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); EOS always stops")
    p.add_argument("--numerics", default="bf16", choices=["fp32", "bf16", "fp16", "fp8"])
    p.add_argument("--chat-template", action="store_true",
                   help="render prompts with the checkpoint's chat template (as transformers' apply_chat_template)")
    p.add_argument("--system-prompt", default=None, help="system message for --chat-template")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same samples")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per engine call")
    p.add_argument("--routes", action="store_true", help="also write the routed experts (MoE models)")
    p.add_argument("--output", "-o", default=None, help="JSONL output file (default: stdout)")


def read_prompts(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) for each non-blank line; UserError naming FILE:LINE on the first bad one."""
    if not path.is_file():
        what = "not a regular file" if path.exists() else "no such file"
        raise UserError(f"{path}: {what}; expected a JSONL file of prompts")
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict) or "prompt" not in rec:
                raise UserError(f"{path}:{i}: expected an object with a \"prompt\" field")
            if not isinstance(rec["prompt"], str):
                raise UserError(f"{path}:{i}: \"prompt\" must be a string, got {type(rec['prompt']).__name__}")
            out.append((i, rec["prompt"]))
    if not out:
        raise UserError(f"{path}: no prompts (the file is empty)")
    return out


def run(args) -> int:
    import torch

    from stablerl.config import TaskConfig
    from stablerl.engine import Engine
    from stablerl.hf import get_model
    from stablerl.tokenizer import prompt_tokenizer

    path = Path(args.prompts)
    lines = read_prompts(path)
    if args.n < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--n, --batch-size and --max-new-tokens must be >= 1")
    if args.system_prompt is not None and not args.chat_template:
        raise UserError("--system-prompt: needs --chat-template (the system prompt is a message of the chat template)")
    model, tok = get_model(args.model)  # presets: seed 0
    tok = prompt_tokenizer(tok, TaskConfig(chat_template=args.chat_template, system_prompt=args.system_prompt))
    engine = Engine(model, tok, numerics=args.numerics)
    for lineno, prompt in lines:  # all checked before any output: a long prompt never leaves a partial file
        try:
            ids = engine.tokenizer.encode_prompt(prompt)
        except UserError as e:  # e.g. the chat template's raise_exception on this prompt
            raise UserError(f"{path}:{lineno}: {e}") from None
        if why := engine.problem(ids):
            raise UserError(f"{path}:{lineno}: {why}")
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.output).open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        for start in range(0, len(lines), args.batch_size):
            prompts = [p for _, p in lines[start:start + args.batch_size]]
            ro = engine.generate(prompts, n=args.n, temperature=args.temperature, top_p=args.top_p,
                                 top_k=args.top_k, max_new_tokens=args.max_new_tokens, stop=tuple(args.stop),
                                 seed=gen, return_routes=args.routes)
            for i in range(len(ro.texts)):
                b, t = int(ro.prompt_index[i]), int(ro.lengths[i])
                rec = {"prompt": prompts[b], "line": lines[start + b][0], "sample": i % args.n,
                       "completion": ro.texts[i], "token_ids": ro.tokens[i, :t].tolist(),
                       "logprobs": [round(x, 6) for x in ro.logp_infer[i, :t].tolist()],
                       "finish_reason": ro.finish_reason[i]}
                if args.routes and ro.routes_infer is not None:
                    rec["routes"] = ro.routes_infer[i, :t].tolist()  # (T, L, K) experts per response token
                    rec["prompt_routes"] = ro.prompt_routes[i].tolist()  # (P, L, K), one per prompt token
                out.write(json.dumps(rec) + "\n")
            out.flush()
    except BrokenPipeError:  # `stablerl generate ... | head`: the reader has all it wants (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
