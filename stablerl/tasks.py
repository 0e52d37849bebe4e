"""Built-in synthetic math tasks: problems with step-by-step solution traces, generated from a seed.

Made for the tiny char-level default model (except `add_qa`, a plain question for pretrained chat models):
printable ASCII and newlines only, prompts under ~24 characters, traces under ~60, so cold-start SFT and RL both fit
in minutes on a CPU. Each problem comes with three SFT responses (`Example.traces`), one per trace style, all ending
in an `Answer: ...` line that the task's reward function (`Task.reward`, a name for `rewards.score`) scores 1:

    long    the full scratchpad (every column / algebra step / combination)
    short   a compressed scratchpad (column sums / the one key step / the checked expression)
    answer  the final answer line only

Train and held-out splits partition the problem space by a hash of each problem's canonical key (1 in
HELDOUT_EVERY is held out), so they are disjoint whatever `n`, `seed` or knobs are asked for; variants
that are the same problem (37+48 and 48+37) share a key and so a split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from stablerl.data import Example
from stablerl.errors import UserError
from stablerl.rewards import countdown_spec

TRACE_STYLES = ("long", "short", "answer")
HELDOUT_EVERY = 8


@dataclass(frozen=True)
class Problem:
    key: str  # canonical identity; decides the split
    prompt: str
    answer: str  # what Example.answer holds for the task's reward function
    long: list[str]  # scratchpad lines
    short: list[str]
    final: str  # the text after "Answer: "

    def example(self, task: str) -> Example:
        line = f"Answer: {self.final}"
        traces = {"long": "\n".join([*self.long, line]), "short": "\n".join([*self.short, line]), "answer": line}
        return Example(self.prompt, self.answer, traces, {"task": task, "key": self.key})


def _check(ok: bool, task: str, msg: str) -> None:
    if not ok:
        raise UserError(f"task {task}: {msg}")


# ---- arith: multi-digit addition / subtraction with a column scratchpad --------------------------------------------


def arith(rng: random.Random, digits: int = 4, n_terms: int = 3, op: str = "+") -> Problem:
    """`Q: 374+485` → one line per column, right to left, with the carry of the previous column:
    4+5=9 / 7+8=15 / 3+4+1=8. Subtraction writes signed column values (2-7=-5: digit 5, borrow 1).

    The default (4 digits, 3 terms) is calibrated for the tiny model's cold start: see docs/tasks.md."""
    _check(type(digits) is int and 1 <= digits <= 9, "arith", f"digits must be an integer in 1..9, got {digits!r}")
    _check(type(n_terms) is int and 2 <= n_terms <= 9, "arith", f"n_terms must be an integer in 2..9, got {n_terms!r}")
    _check(op in ("+", "-"), "arith", f"op must be '+' or '-', got {op!r}")
    lo, hi = (10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1
    for _ in range(1000):
        terms = [rng.randint(lo, hi) for _ in range(n_terms)]
        if op == "+":
            break
        terms.sort(reverse=True)  # the largest first, and only when the result is >= 0: the last column never borrows
        if terms[0] >= sum(terms[1:]):
            break
    else:
        raise UserError(f"task arith: op '-' with n_terms={n_terms}, digits={digits} rarely has a result >= 0; "
                        "use fewer terms")
    sign = 1 if op == "+" else -1
    lines, sums, carry = [], [], 0
    for col in range(digits):
        ds = [t // 10**col % 10 for t in terms]
        v = ds[0] + sign * sum(ds[1:]) + carry
        lines.append(str(ds[0]) + "".join(f"{op}{d}" for d in ds[1:]) + (f"{carry:+d}" if carry else "") + f"={v}")
        sums.append(str(v))
        carry = v // 10  # floor: -5 // 10 == -1, a borrow
    result = terms[0] + sign * sum(terms[1:])
    key = "+".join(map(str, sorted(terms))) if op == "+" else "-".join(map(str, terms))  # a+b is b+a
    return Problem(key, f"Q: {op.join(map(str, terms))}\n", str(result), lines, [",".join(sums)], str(result))


# ---- linear: a*x+b=c for integer x ---------------------------------------------------------------------------------


def _coef(a: int) -> str:
    return {1: "", -1: "-"}.get(a, str(a))


def linear(rng: random.Random, coef_max: int = 9, x_max: int = 10, b_max: int = 10, negative: bool = True) -> Problem:
    """`Q: 3x+5=20` → 3x=20-5 / 3x=15 / x=15/3 / Answer: 5. With `negative`, a, b, c and x may be negative."""
    for knob, v in (("coef_max", coef_max), ("x_max", x_max), ("b_max", b_max)):
        _check(type(v) is int and 1 <= v <= 999, "linear", f"{knob} must be an integer in 1..999, got {v!r}")
    _check(type(negative) is bool, "linear", f"negative must be true or false, got {negative!r}")

    def nonzero(m: int) -> int:
        v = rng.randint(1, m)
        return -v if negative and rng.random() < 0.5 else v

    a, b = nonzero(coef_max), nonzero(b_max)
    x = rng.randint(-x_max if negative else 0, x_max)
    c = a * x + b
    eq = f"{_coef(a)}x{b:+d}={c}"
    ax, rhs = f"{_coef(a)}x", c - b
    lines = [f"{ax}={c}{-b:+d}", f"{ax}={rhs}"]
    if a == -1:
        lines.append(f"x={-rhs}")
    elif a != 1:
        lines.append(f"x={rhs}/{a}")
    return Problem(eq, f"Q: {eq}\n", str(x), lines, [f"{ax}={rhs}"], str(x))


# ---- countdown: reach a target with the given numbers --------------------------------------------------------------

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def _operand(text: str, prec: int, op: str, right: bool) -> str:
    # Minimal parentheses: a lower-precedence operand, or an equal one right of a non-associative op (a-(b-c)).
    needs = prec < _PREC[op] or (right and prec == _PREC[op] and op in "-/")
    return f"({text})" if needs else text


def _countdown_try(rng: random.Random, n_numbers: int, max_number: int, ops: str, target_max: int) -> Problem | None:
    nums = [rng.randint(1, max_number) for _ in range(n_numbers)]
    pool = [(n, str(n), _ATOM) for n in nums]  # (value, expression, precedence), as in the game: combine two
    steps = []
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        (x, xs, xp), (y, ys, yp) = pool[i], pool[j]
        op = rng.choice(ops)
        if op in "-/" and x < y:
            (x, xs, xp), (y, ys, yp) = (y, ys, yp), (x, xs, xp)
        if op == "/" and x % y:
            return None
        r = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
        if r <= 0:  # no zero or negative intermediates: they make trivial or unreadable puzzles
            return None
        steps.append(f"{x}{op}{y}={r}")
        expr = _operand(xs, xp, op, right=False) + op + _operand(ys, yp, op, right=True)
        pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(r, expr, _PREC[op])]
    target, expr = pool[0][0], pool[0][1]
    if target > target_max or target in nums:  # a target among the numbers is solved by copying it
        return None
    shown = sorted(nums)
    spec = countdown_spec(target, shown)
    return Problem(spec, f"Q: {target} from {' '.join(map(str, shown))}\n", spec, steps, [f"{expr}={target}"], expr)


def countdown(rng: random.Random, n_numbers: int = 4, max_number: int = 10, ops: str = "+-*",
              target_max: int = 100) -> Problem:
    """`Q: 24 from 3 4 6 8` → 8-6=2 / 2*3=6 / 6*4=24 / Answer: (8-6)*3*4. The answer is an expression using
    each given number at most once; the `countdown` reward evaluates it safely (rewards.eval_countdown)."""
    _check(type(n_numbers) is int and 2 <= n_numbers <= 6, "countdown",
           f"n_numbers must be an integer in 2..6, got {n_numbers!r}")
    _check(type(max_number) is int and 2 <= max_number <= 100, "countdown",
           f"max_number must be an integer in 2..100, got {max_number!r}")
    _check(isinstance(ops, str) and bool(ops) and set(ops) <= set("+-*/") and bool(set(ops) & set("+*")),
           "countdown", f"ops must be a string over '+-*/' containing '+' or '*', got {ops!r}")
    _check(type(target_max) is int and target_max >= 1, "countdown", f"target_max must be >= 1, got {target_max!r}")
    for _ in range(10_000):
        if p := _countdown_try(rng, n_numbers, max_number, ops, target_max):
            return p
    raise UserError(f"task countdown: no puzzle found with n_numbers={n_numbers}, max_number={max_number}, "
                    f"ops={ops!r}, target_max={target_max}")


# ---- add_qa: "What is a + b?" for pretrained chat models ------------------------------------------------------------


def add_qa(rng: random.Random, digits: int = 2) -> Problem:
    """`What is 37 + 48?` → 37 + 48 = 85. A question as a user would type it, for a pretrained instruct model
    prompted through its chat template (task.chat_template=true), not for the char-level tiny model. The `math`
    reward reads the answer as such a model gives it: a \\boxed{} or `Answer:` line when it writes one, else the last
    number of its reply ("23 + 58 = 81." -> 81), checked numerically (math-verify for anything else). SmolLM2-135M-
    Instruct, greedy, gets 2-digit sums right ~6% of the time: RL has room (recipes/smollm2.yaml)."""
    _check(type(digits) is int and 1 <= digits <= 6, "add_qa", f"digits must be an integer in 1..6, got {digits!r}")
    lo, hi = (10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    eq = f"{a} + {b} = {a + b}"
    return Problem(f"{min(a, b)}+{max(a, b)}", f"What is {a} + {b}?", str(a + b), [eq], [eq], str(a + b))


# ---- registry ------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, tuple[Callable[..., Problem], str]] = {
    "arith": (arith, "math"),
    "linear": (linear, "math"),
    "countdown": (countdown, "countdown"),
    "add_qa": (add_qa, "math"),
}
TASKS = tuple(_REGISTRY)


@dataclass(frozen=True)
class Task:
    name: str
    sample: Callable[..., Problem]  # (rng, **knobs) -> one random problem
    reward: str  # reward function name for rewards.score
    knobs: dict = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.knobs.items())})"

    def split_of(self, key: str) -> str:
        h = int.from_bytes(hashlib.blake2b(f"{self.name}|{key}".encode(), digest_size=8).digest(), "big")
        return "heldout" if h % HELDOUT_EVERY == 0 else "train"

    def train(self, n: int = 4096, seed: int = 0) -> list[Example]:
        return self._draw("train", n, seed)

    def heldout(self, n: int = 256, seed: int = 0) -> list[Example]:
        return self._draw("heldout", n, seed)

    def _draw(self, split: str, n: int, seed: int) -> list[Example]:
        """n distinct problems of one split. Rejection sampling: the other split's problems are drawn and
        dropped, which is what keeps the splits disjoint whatever the seed."""
        rng = random.Random(f"{self}|{split}|{seed}")  # str seeds hash with sha512: stable across runs
        seen: set[str] = set()
        out: list[Example] = []
        for _ in range(50 * n + 10_000):
            if len(out) == n:
                break
            p = self.sample(rng, **self.knobs)
            if p.key not in seen and self.split_of(p.key) == split:
                seen.add(p.key)
                out.append(p.example(self.name))
        if len(out) < n:
            raise UserError(f"task {self}: found only {len(out)} distinct {split} problems, asked for {n}; "
                            "ask for fewer or make the task harder")
        return out


def get_task(name: str, **knobs) -> Task:
    """A built-in task with its difficulty knobs (see each generator's signature for names and defaults)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown task {name!r} (available: {', '.join(TASKS)})")
    sample, reward = _REGISTRY[name]
    allowed = sample.__code__.co_varnames[1 : sample.__code__.co_argcount]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise UserError(f"task {name}: unknown knob {unknown[0]!r} (knobs: {', '.join(allowed)})")
    defaults = dict(zip(allowed, sample.__defaults__, strict=True))
    task = Task(name, sample, reward, {**defaults, **knobs})
    task.sample(random.Random(0), **task.knobs)  # validates the knobs now, not at the first train()
    return task


def task_examples(task_cfg, split: str) -> list[Example]:
    """The `train` or `heldout` examples a `TaskConfig` points at: its data file for that split when it names one,
    else the built-in task's split (data seed 0, so every run of a task sees the same problems)."""
    from stablerl.data import load_examples

    path = task_cfg.data if split == "train" else task_cfg.heldout_data
    if path:
        return load_examples(path, prompt_key=task_cfg.prompt_key, answer_key=task_cfg.answer_key)
    task = get_task(task_cfg.name, **task_cfg.knobs)
    return task.train(task_cfg.n_train, seed=0) if split == "train" else task.heldout(task_cfg.n_heldout, seed=0)
