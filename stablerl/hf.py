"""Hugging Face checkpoint directories in and out: `config.json` + `*.safetensors` (sharded too) + tokenizer files.

`get_model(name)` gives (model, tokenizer) for a preset, a local directory or a hub id; `save_model` writes the same
layout back atomically. Every problem a user can cause (a missing or corrupt file, an unsupported architecture,
weights that do not match config.json, a full disk) is a `UserError` naming the file and what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stablerl.convert import ALIASES, is_gguf, resolve_gguf
from stablerl.errors import UserError, describe_os_error, one_line, read_json
from stablerl.model import PRESETS, ModelConfig, Transformer, build_model, rope_inv_freq
from stablerl.tokenizer import TextTokenizer


def save_model(model: Transformer, directory: str | Path, tokenizer=None, max_shard_bytes: int = 2 << 30) -> None:
    """Write config.json + safetensors (sharded with an index past `max_shard_bytes`) atomically: a failure
    (disk full, permission denied) raises UserError naming the directory and leaves no partial directory."""
    directory = Path(directory)
    tmp = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        _write(model, tmp, tokenizer, max_shard_bytes)
        # Swap in the finished directory: a crash at any point leaves either the old or the new checkpoint.
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except (OSError, SafetensorError) as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(describe_os_error(e, "cannot write the model", directory)) from e

def _write(model: Transformer, directory: Path, tokenizer, max_shard_bytes: int) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # HF omits the tied copy
    (directory / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, sh in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, str(directory / name), metadata=meta)
            weight_map.update(dict.fromkeys(sh, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        tokenizer.save(directory)


def resolve_dir(name: str | Path) -> Path:
    """A local directory, a GGUF file or alias (`smollm2`: converted once into a cache, stablerl.convert), or a hub id
    (e.g. `Qwen/Qwen3-0.6B`) fetched with huggingface_hub when installed."""
    p = Path(name)
    if p.is_dir():
        return p
    if str(name) in ALIASES or str(name).endswith(".gguf") or is_gguf(p):
        return resolve_gguf(name, check=load_model)
    if p.exists():
        raise UserError(f"{p}: expected a checkpoint directory (config.json + *.safetensors) or a .gguf file, "
                        "got another file")
    if str(name).count("/") == 1 and not str(name).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise UserError(f"{name}: not a local directory; to fetch it from the hub, "
                            "pip install 'stablerl[hub]'") from None
        try:
            return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
        except Exception as e:  # no network, unknown repo, gated model: the hub's own words, on one line
            raise UserError(f"{name}: not a local directory, and the hub download failed "
                            f"({type(e).__name__}: {one_line(e)[:200]})") from None
    raise UserError(f"{name}: no such checkpoint directory; expected a preset ({', '.join(PRESETS)}), a directory "
                    f"with config.json + *.safetensors, a .gguf file, {', '.join(ALIASES)} or a hub id")


# config.json keys without which the computation is undefined (the rest have HF's defaults)
_CORE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
REQUIRED_KEYS = {"qwen3_moe": (*_CORE, "moe_intermediate_size", "num_experts_per_tok"),
                 "qwen3": (*_CORE, "intermediate_size"), "llama": (*_CORE, "intermediate_size")}


def read_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.exists():
        raise UserError(f"{path}: missing; a checkpoint directory holds config.json + *.safetensors (+ tokenizer.json)")
    d = read_json(path)
    missing = [k for k in REQUIRED_KEYS.get(d.get("model_type"), ()) if k not in d]
    if d.get("model_type") == "qwen3_moe" and "num_experts" not in d and "num_local_experts" not in d:
        missing.append("num_experts")
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)} for model_type {d['model_type']!r}")
    try:
        return ModelConfig.from_hf(d, where=str(path))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(one_line(e) if str(path) in str(e) else f"{path}: {type(e).__name__}: {one_line(e)}") from None


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no weight_map; the index is corrupt: restore or re-save the checkpoint")
        files = [directory / f for f in sorted(set(weight_map.values()))]
    elif (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    else:
        raise UserError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (OSError, SafetensorError) as e:
            if isinstance(e, OSError):
                raise UserError(describe_os_error(e, "cannot read the weights", f)) from None
            raise UserError(f"{f}: cannot read the weights ({one_line(e)}); the file is truncated or corrupt: "
                            "restore it, or re-download / re-save the checkpoint") from None
    return state


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    directory = resolve_dir(directory)
    cfg = read_config(directory)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = load_state(directory)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise UserError(f"{directory}: weights do not match config.json: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")
    shapes = model.state_dict()
    wrong = [f"{k} {tuple(state[k].shape)} (config.json says {tuple(shapes[k].shape)})" for k in sorted(expected)
             if state[k].shape != shapes[k].shape]
    if wrong:
        raise UserError(f"{directory}: weights do not match config.json: {'; '.join(wrong[:3])}")
    # clone: fresh, aligned memory rather than safetensors' buffer, so kernels (and results) match a built model
    model.load_state_dict({k: state[k].to(dtype).clone() for k in expected}, assign=True, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg)
    return model


def get_model(name: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a preset name, a checkpoint directory or a hub id."""
    if str(name) in PRESETS:
        model = build_model(PRESETS[str(name)], seed).to(dtype)
        return model, TextTokenizer.char()
    model = load_model(name, dtype)
    # the directory, not the model config: the tokenizer reads every EOS id (config.json, generation_config.json)
    return model, TextTokenizer.load(resolve_dir(name))
