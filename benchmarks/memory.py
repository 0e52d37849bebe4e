"""Peak memory of RL steps against the vocabulary size: flat in V apart from weights and optimizer state.

    python benchmarks/memory.py [--vocab 1000 32000 151936] [--steps 2] [--responses 64] [--tokens 256]

For each V, a fresh process builds a Qwen3-MoE-shaped model (hidden 64, 2 layers, 4 experts, top-2) with a V-token
vocabulary (the built-in characters plus filler tokens), and runs `--steps` RL steps of B x G = `--responses`
responses of up to `--tokens` tokens each (EOS is one token in V, so almost every response runs to the limit).
The reward is a parity of the completion's characters, so about half the groups carry signal and the updates run.
It prints the process's peak RSS beside what V alone must cost: the V-dependent parameters (embedding and LM head)
x 16 bytes (fp32 weight, gradient, two Adam moments) plus the engine's copy of them; the rest of the growth would be
logits, which stablerl never materialises for the whole batch (stablerl.sequences.policy_logprobs).
Writes benchmarks/results/memory.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
from stablerl.config import load_config
from stablerl.hf import save_model
from stablerl.model import ModelConfig, build_model
from stablerl.trainer import train
from memory import filler_tokenizer

V, steps, B, G, T = map(int, sys.argv[1:6])
out = sys.argv[6]
cfg = ModelConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                  max_position_embeddings=512)
model = build_model(cfg, seed=0)
with tempfile.TemporaryDirectory() as tmp:
    save_model(model, Path(tmp) / "m", filler_tokenizer(V))
    del model
    run = load_config(None, [f"out_dir={tmp}", "name=mem", f"init={tmp}/m", f"train.steps={steps}",
                             f"train.batch_prompts={B}", f"train.group_size={G}", f"engine.max_new_tokens={T}",
                             "train.eval_every=0", "train.save_every=0", "train.fidelity_every=0", "task.n_heldout=1",
                             "task.reward=memory:parity", "engine.numerics=bf16"])
    t0 = time.perf_counter()
    train(run, show_progress=False)
    rows = [json.loads(x) for x in (Path(tmp) / "mem" / "metrics.jsonl").read_text().splitlines()]
steps_rows = [r for r in rows if "time/step" in r]
Path(out).write_text(json.dumps({
    "vocab": V, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "params_v_dependent": 2 * V * 64, "seconds": time.perf_counter() - t0,
    "mean_response_tokens": sum(r["length/mean"] for r in steps_rows) / len(steps_rows),
    "updated_minibatches": sum(1 for r in steps_rows if "loss/policy" in r),
}))
"""


def filler_tokenizer(vocab_size: int):
    """The built-in character tokenizer grown to `vocab_size` tokens with fillers `<x123>`, so that every id a
    random model samples decodes to text (and the reward sees it)."""
    from tokenizers import Tokenizer, models

    from stablerl.tokenizer import TextTokenizer, char_tokenizer

    base = char_tokenizer()
    vocab = base.get_vocab(True)
    vocab.update({f"<x{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer, tok.decoder, tok.post_processor = base.pre_tokenizer, base.decoder, base.post_processor
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    return TextTokenizer(tok, bos_id=1, eos_ids=(2,), pad_id=0)


def parity(completion: str, answer: str) -> float:
    """The benchmark's reward: about half the completions score 1, so about half the groups have signal."""
    return float(sum(map(ord, completion)) % 2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[1000, 32000, 151936])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--responses", type=int, default=64, help="B x G, as 8 prompts x G")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out", default="benchmarks/results/memory.json")
    args = p.parse_args()
    G = args.responses // 8
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for V in args.vocab:
            out = Path(tmp) / f"{V}.json"
            r = subprocess.run([sys.executable, "-c", CHILD, str(V), str(args.steps), "8", str(G), str(args.tokens),
                                str(out)], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"V={V}: the run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
            results.append(json.loads(out.read_text()))
    base = results[0]
    print(f"{'V':>8}{'peak RSS GiB':>14}{'growth GiB':>12}{'V params x20 B':>16}{'unexplained':>13}{'resp tokens':>13}"
          f"{'s':>7}")
    for r in results:
        growth = r["peak_rss_gib"] - base["peak_rss_gib"]
        # V-dependent parameters: fp32 weight + grad + 2 Adam moments (16 B) and the engine's copy (<= 4 B)
        expected = (r["params_v_dependent"] - base["params_v_dependent"]) * 20 / 2**30
        r["growth_gib"], r["weights_and_optimizer_growth_gib"] = growth, expected
        print(f"{r['vocab']:>8}{r['peak_rss_gib']:>14.2f}{growth:>12.2f}{expected:>16.2f}{growth - expected:>13.2f}"
              f"{r['mean_response_tokens']:>13.1f}{r['seconds']:>7.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "shape": {"responses": args.responses, "max_tokens": args.tokens, "hidden": 64, "layers": 2,
                  "steps": args.steps},
        "runs": results}, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
