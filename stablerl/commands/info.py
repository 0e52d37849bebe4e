"""`stablerl info`: build (or load) a model, report its size, and time one forward pass."""

import time

import torch
from rich.console import Console
from rich.table import Table

from stablerl.hf import get_model, save_model


def add_arguments(p):
    p.add_argument("--model", default="tiny-moe", help="preset (tiny-moe, tiny-dense), checkpoint dir or hub id")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="also write the model + tokenizer to this directory (HF format)")


def run(args) -> int:
    torch.manual_seed(args.seed)
    model, tok = get_model(args.model, seed=args.seed)
    c = model.config
    ids = torch.tensor([tok.encode_prompt("12+34=")] * 8)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids)
        dt = time.perf_counter() - t0
    table = Table(title=f"stablerl model: {args.model}")
    table.add_column("property")
    table.add_column("value", justify="right")
    rows = [
        ("architecture", c.model_type),
        ("parameters", f"{model.num_params():,}"),
        ("active parameters / token", f"{model.num_params(active=True):,}"),
        ("layers / hidden / heads (kv)", f"{c.num_hidden_layers} / {c.hidden_size} / "
                                         f"{c.num_attention_heads} ({c.num_key_value_heads})"),
        ("experts (top-k)", f"{c.num_experts} ({c.num_experts_per_tok})" if model.is_moe else "dense"),
        ("vocab (tokenizer)", f"{c.vocab_size} ({tok.vocab_size})"),
        ("forward 8x7 tokens", f"{dt * 1e3:.1f} ms, logits {tuple(out.logits.shape)}"),
        ("routes shape (N, T, L, K)", str(tuple(out.routes.shape)) if out.routes is not None else "-"),
    ]
    for r in rows:
        table.add_row(*r)
    Console().print(table)
    if args.save:
        save_model(model, args.save, tok)
        print(f"saved to {args.save}")
    return 0
