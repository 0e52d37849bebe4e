"""Held-out evaluation: greedy accuracy and mean@k of sampled answers, scored by the task's verifier."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stablerl.data import Example
from stablerl.engine import Engine
from stablerl.rewards import score


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # greedy (temperature 0) exact-answer rate
    mean_at_k: float | None  # mean reward of k samples per prompt at temperature 1 (None when k = 0)
    k: int
    n: int
    mean_length: float  # greedy response tokens
    samples: list[dict] = field(default_factory=list)  # a few prompt/completion/reward rows to look at

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "mean_at_k": self.mean_at_k, "k": self.k, "n": self.n,
                "mean_length": self.mean_length}


@torch.inference_mode()
def evaluate(engine: Engine, examples: list[Example], max_new_tokens: int, k: int = 0, reward: str = "math",
             timeout: float = 5.0, seed: int = 0, n_samples: int = 4, batch: int = 256) -> EvalResult:
    prompts = [e.prompt for e in examples]
    answers = [e.answer for e in examples]
    texts, lengths = [], []
    for i in range(0, len(prompts), batch):  # chunks keep the KV cache small for big eval sets
        ro = engine.generate(prompts[i : i + batch], n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)
        texts += ro.texts
        lengths += ro.mask.sum(1).tolist()
    greedy = score(texts, answers, fn=reward, timeout=timeout)
    acc = float(sum(greedy.rewards)) / max(1, len(examples))
    mean_k = None
    if k > 0:
        ro = engine.generate(prompts, n=k, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed + 1)
        sampled = score(ro.texts, [a for a in answers for _ in range(k)], fn=reward, timeout=timeout)
        mean_k = float(sum(sampled.rewards)) / max(1, len(sampled.rewards))
    samples = [{"prompt": prompts[i], "completion": texts[i], "answer": answers[i], "reward": greedy.rewards[i]}
               for i in range(min(n_samples, len(examples)))]
    return EvalResult(acc, mean_k, k, len(examples), sum(lengths) / max(1, len(lengths)), samples)
