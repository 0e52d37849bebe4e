"""`stablerl convert SRC OUT`: a GGUF file (or an alias such as `smollm2`) to an fp32 HF checkpoint directory.

Needs the optional extra: pip install 'stablerl[gguf]'. `model=path/to/file.gguf` does the same conversion on the fly,
once, into the cache (stablerl.convert)."""

import time


def add_arguments(p):
    p.add_argument("src", help="a .gguf file, or an alias of an installed package's GGUF (smollm2)")
    p.add_argument("out", help="output directory (config.json + model.safetensors + tokenizer.json + chat template)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")


def run(args) -> int:
    from stablerl.convert import ALIASES, alias_gguf, convert
    from stablerl.hf import load_model, read_config

    src = alias_gguf(args.src) if args.src in ALIASES else args.src
    t0 = time.perf_counter()
    out = convert(src, args.out, overwrite=args.overwrite, check=load_model)
    cfg = read_config(out)
    print(f"converted {src} -> {out} ({cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"vocab {cfg.vocab_size}, fp32) in {time.perf_counter() - t0:.0f}s")
    return 0
