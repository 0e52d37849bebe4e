"""Verifiable rewards: answer extraction, verification, and scoring that never crashes a run.

A reward function is `fn(completion: str, answer: str) -> float`, named either by a registered name
(`"math"`, `"exact"`, `"numeric"`, `"countdown"`) or by import path `"package.module:function"`.

`score()` is what the trainer calls. The built-in verifiers that provably finish fast (string and
rational comparisons, the countdown evaluator) run in-process; only what needs `math-verify` (sympy,
which can hang on adversarial input) and every user function run in a persistent pool of worker
processes, one item at a time, under a per-item timeout. A worker that overruns is killed and
respawned; exceptions, timeouts and dead workers give reward 0 and are counted, never raised.
"""

from __future__ import annotations

import ast
import atexit
import importlib
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection, wait

RewardFn = Callable[[str, str], float]
MODES = ("exact", "numeric", "math", "auto")

# ---- answer extraction --------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER = re.compile(r"answer\s*\**\s*:", re.IGNORECASE)
# A leading minus only when it cannot be a binary minus ("10-4" ends in 4, not -4).
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def _boxed_content(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start - 1], or None when the braces never close."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: last `\\boxed{}`, else the last `Answer:` line, else the last number."""
    for m in reversed(list(_BOXED.finditer(text))):
        content = _boxed_content(text, m.end())
        if content is not None:  # an unclosed box is malformed output: look further back, then at other markers
            return content.strip() or None
    answers = list(_ANSWER.finditer(text))
    if answers:
        line = text[answers[-1].end() :].split("\n", 1)[0]
        # "Answer:" with nothing after it is a declared-but-missing answer, not a cue to go hunting for numbers.
        return line.strip().strip("*").strip() or None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


# ---- verification -------------------------------------------------------------------------------------------------

_MAX_NUMBER_CHARS = 64  # longer "numbers" go to math-verify (in a worker): keeps the in-process path bounded
_VARIABLE = re.compile(r"^[A-Za-z]\w*\s*=\s*")  # "x = 5"
_UNITS = re.compile(r"(?:\s*(?:\\(?:text|mathrm|mbox)\{[^{}]*\}|\\?%|\^\s*\{?\\circ\}?|°|\s(?!pi\b)[A-Za-z]{2,}\.?))+$")
_LATEX_FRAC = re.compile(r"^([+-]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_DECIMAL = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^[+-]?\.\d+$")
_SLASH = re.compile(r"^([+-]?\d+)\s*/\s*(\d+)$")


def _strip_math(s: str) -> str:
    s = s.strip().rstrip(".").strip()
    if len(s) >= 2 and s[0] == s[-1] == "$":
        s = s[1:-1].strip()
    return " ".join(s.split())


def parse_number(s: str) -> Fraction | None:
    """A plain number as an exact rational: `-12`, `1,234.5`, `3/4`, `\\frac{3}{4}`, `12 cm`, `50\\%`, `x=5`.

    Units and percent signs are dropped: the answer is the number (graders of math answers do the same).
    Anything else (expressions, exponents, very long strings) is None and left to math-verify.
    """
    s = _strip_math(s).replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    s = _UNITS.sub("", _VARIABLE.sub("", s)).strip()
    if m := _LATEX_FRAC.match(s):
        num, den = parse_number(m[2]), parse_number(m[3])
        if num is None or den is None or den == 0:
            return None
        return -num / den if m[1] == "-" else num / den
    if m := _SLASH.match(s):
        return Fraction(int(m[1]), int(m[2])) if int(m[2]) != 0 else None
    if _DECIMAL.match(s):
        return Fraction(s.replace(",", ""))
    return None


def _close(a: Fraction, b: Fraction, rel_tol: float) -> bool:
    return a == b or abs(a - b) <= Fraction(rel_tol) * max(1, abs(b))


def _verify_fast(pred: str | None, answer: str, mode: str, rel_tol: float) -> float | None:
    """The stages of `verify` that cannot hang; None means only math-verify can decide."""
    if mode not in MODES:
        raise ValueError(f"verify mode {mode!r} unknown (allowed: {', '.join(MODES)})")
    if pred is None:
        return 0.0
    if mode in ("exact", "auto") and _strip_math(pred) == _strip_math(answer):
        return 1.0
    if mode == "exact":
        return 0.0
    if mode in ("numeric", "auto"):
        a, b = parse_number(pred), parse_number(answer)
        if a is not None and b is not None:
            return float(_close(a, b, rel_tol))
        if mode == "numeric":
            return 0.0
    return None


def verify(pred: str | None, answer: str, mode: str = "auto", rel_tol: float = 1e-6) -> float:
    """1.0 when the extracted answer `pred` matches the reference `answer`, else 0.0.

    exact: equal after trimming whitespace, `$…$` and a final period. numeric: both parse as numbers
    (`parse_number`) and agree within `rel_tol` relative (absolute below 1). math: symbolic
    equivalence by math-verify. auto: exact, else numeric when both are numbers, else math.
    Runs inline with no time limit: use `score` for untrusted model output.
    """
    fast = _verify_fast(pred, answer, mode, rel_tol)
    return fast if fast is not None else float(_math_equal(pred, answer))


def _math_verify():
    import math_verify

    # We disable math-verify's own signal.alarm timeouts (they only work in a main thread, and score()
    # enforces its own by killing the worker); silence the warnings it logs about that.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def _math_equal(pred: str, answer: str) -> bool:
    mv = _math_verify()

    def parse(s: str):
        # Bare strings like "\sqrt{2}/2" parse only inside math delimiters; plain "5" works either way.
        return mv.parse(f"${s}$", parsing_timeout=None) or mv.parse(s, parsing_timeout=None)

    gold, target = parse(answer), parse(pred)
    return bool(gold and target and mv.verify(gold, target, timeout_seconds=None))


# ---- built-in reward functions ------------------------------------------------------------------------------------


def math_reward(completion: str, answer: str) -> float:
    """Default: extract the final answer, then `verify(mode="auto")`."""
    return verify(extract_answer(completion), answer)


def exact_reward(completion: str, answer: str) -> float:
    return verify(extract_answer(completion), answer, mode="exact")


def numeric_reward(completion: str, answer: str) -> float:
    return verify(extract_answer(completion), answer, mode="numeric")


_MAX_EXPR_CHARS = 100  # bounds the countdown evaluator's work (and the parser's recursion)
_CD_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}


def countdown_spec(target: int, numbers: Sequence[int]) -> str:
    """The `answer` string of a countdown problem: `"24:3,4,6,8"` (target, then the numbers allowed)."""
    return f"{target}:{','.join(str(n) for n in numbers)}"


def eval_countdown(expr: str, numbers: Sequence[int]) -> Fraction | None:
    """Value of an arithmetic expression (+ - * / and parentheses on integer literals), or None when it is
    not one, divides by zero, or uses a number more often than `numbers` holds it. Parsed with `ast` and
    evaluated on exact rationals: never `eval`."""
    if len(expr) > _MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        return None
    used: list[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _CD_OPS:
            return _CD_OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("not a countdown expression")

    try:
        v = value(tree)
    except (ValueError, ZeroDivisionError):
        return None
    return v if not Counter(used) - Counter(numbers) else None


def countdown_reward(completion: str, answer: str) -> float:
    """1.0 when the final answer is an expression over the given numbers (each at most once) equal to the target."""
    target_s, _, numbers_s = answer.partition(":")
    target, numbers = int(target_s), [int(n) for n in numbers_s.split(",")]  # a bad spec raises: counted as error
    expr = extract_answer(completion)
    if expr is None:
        return 0.0
    expr = expr.split("=")[0]  # "Answer: (8-6)*3*4=24" still counts
    return float(eval_countdown(expr, numbers) == target)


# ---- registry -----------------------------------------------------------------------------------------------------

REWARDS: dict[str, str] = {
    "math": "stablerl.rewards:math_reward",
    "exact": "stablerl.rewards:exact_reward",
    "numeric": "stablerl.rewards:numeric_reward",
    "countdown": "stablerl.rewards:countdown_reward",
}
# Bounded work on bounded input: safe to run in the trainer's process. "math" is here only through its fast path.
_INLINE = {REWARDS["exact"], REWARDS["numeric"], REWARDS["countdown"]}


def register_reward(name: str, fn: str | RewardFn) -> None:
    """Make `name` usable as `score(..., fn=name)`. `fn` is an import path or a module-level function
    (workers import it by path, so it must be importable from a fresh interpreter)."""
    REWARDS[name] = _spec_of(fn)


def _spec_of(fn: str | RewardFn) -> str:
    if isinstance(fn, str):
        return REWARDS.get(fn, fn)
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise ValueError(f"reward function {fn!r} is not importable by path: define it at module level "
                         "in an importable module, or pass 'package.module:function'")
    return f"{module}:{qualname}"


def resolve_reward(fn: str | RewardFn) -> RewardFn:
    """The callable behind a registered name or `"package.module:function"`; one-line ValueError otherwise."""
    spec = _spec_of(fn)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r} unknown: use one of {', '.join(sorted(REWARDS))} "
                         "or an import path 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix, shown on one line
        raise ValueError(f"reward {spec!r} cannot be loaded: {_one_line(e)}") from e
    if not callable(obj):
        raise ValueError(f"reward {spec!r} is not callable")
    return obj


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def _as_reward(x) -> float:
    r = float(x)
    if not math.isfinite(r):
        raise ValueError(f"reward function returned {r}")
    return r


# ---- scoring ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreResult:
    rewards: list[float]  # (N,) one per completion; 0.0 where scoring failed
    n_errors: int = 0  # the reward function raised, returned a non-finite value, or its worker died
    n_timeouts: int = 0  # killed after `timeout` seconds
    first_error: str | None = None  # one line, for the log


def score(completions: Sequence[str], answers: Sequence[str], fn: str | RewardFn = "math", timeout: float = 5.0,
          workers: int | None = None) -> ScoreResult:
    """Reward each completion against its answer. Never raises for a failing reward function: a raise, a
    non-finite value or `timeout` seconds on one item give that item 0.0 and are counted. Raises ValueError
    only for caller mistakes (length mismatch, unknown `fn`)."""
    if len(completions) != len(answers):
        raise ValueError(f"score: {len(completions)} completions but {len(answers)} answers")
    spec = _spec_of(fn)
    func = resolve_reward(spec)  # import errors surface here, once, in the caller's process
    rewards, errors, pending = [0.0] * len(completions), [], []
    for i, (c, a) in enumerate(zip(completions, answers)):
        if spec not in _INLINE and spec != REWARDS["math"]:
            pending.append(i)
            continue
        try:
            r = _verify_fast(extract_answer(c), a, "auto", 1e-6) if spec == REWARDS["math"] else _as_reward(func(c, a))
        except Exception as e:  # noqa: BLE001 - a reward must never crash the run
            errors.append(_one_line(e))
            continue
        if r is None:
            pending.append(i)  # needs math-verify: isolate it
        else:
            rewards[i] = r
    n_timeouts = 0
    if pending:
        items = [(i, completions[i], answers[i]) for i in pending]
        for i, (status, value) in _get_pool(workers).run(spec, items, timeout).items():
            if status == "ok":
                rewards[i] = value
            elif status == "timeout":
                n_timeouts += 1
            else:
                errors.append(value)
    return ScoreResult(rewards, len(errors), n_timeouts, errors[0] if errors else None)


# ---- the worker pool ----------------------------------------------------------------------------------------------


def _worker_main(read_fd: int, write_fd: int) -> None:
    """Worker loop: receive (spec, items), send (index, status, value) after each item, so the parent can
    time every item separately."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it shuts us down
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    _math_verify().parse("$1$", parsing_timeout=None)  # pay math-verify's imports before the first timed item
    outbox.send("ready")
    funcs: dict[str, RewardFn] = {}
    while True:
        try:
            spec, items, path = inbox.recv()
        except EOFError:  # parent closed the pipe or died
            return
        sys.path[:] = path  # the parent's path now, so user reward modules import the same way
        for i, completion, answer in items:
            try:
                if spec not in funcs:
                    funcs[spec] = resolve_reward(spec)
                outbox.send((i, "ok", _as_reward(funcs[spec](completion, answer))))
            except BaseException as e:  # noqa: BLE001 - SystemExit from user code is an error, not our exit
                outbox.send((i, "error", _one_line(e)))


class _Worker:
    def __init__(self) -> None:
        self.queue: deque[tuple[int, str, str]] = deque()  # items sent and not yet answered, in order
        self.started = 0.0  # when the item at queue[0] started
        self._start()

    def _start(self) -> None:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        # A fresh interpreter (not multiprocessing's spawn) so the parent's __main__ (the CLI, torch) is not
        # re-imported in every worker; fork is avoided because the trainer process is multi-threaded.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(os.path.abspath(p) for p in sys.path))
        code = f"from stablerl.rewards import _worker_main; _worker_main({task_r}, {result_w})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(task_r, result_w), env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.close(task_r)
        os.close(result_w)
        self.tasks, self.results = Connection(task_w, readable=False), Connection(result_r, writable=False)

    def wait_ready(self, deadline: float) -> None:
        if not self.results.poll(max(0.0, deadline - time.monotonic())) or self.results.recv() != "ready":
            raise RuntimeError("reward worker did not start")

    def submit(self, spec: str, items: list[tuple[int, str, str]]) -> None:
        self.queue = deque(items)
        if items:
            self.tasks.send((spec, items, [os.path.abspath(p) for p in sys.path]))
        self.started = time.monotonic()

    def restart(self, spec: str, startup_s: float) -> None:
        """Kill the process (it overran or died) and resend the items it had not answered to a fresh one."""
        rest = list(self.queue)
        self.close(kill=True)
        self._start()
        self.wait_ready(time.monotonic() + startup_s)
        self.submit(spec, rest)

    def close(self, kill: bool = False) -> None:
        for conn in (self.tasks, self.results):
            conn.close()  # EOF tells a healthy worker to exit
        if kill:
            self.proc.kill()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()  # reap: no zombies


class _Pool:
    """Persistent worker processes. Items are split into contiguous chunks, one per worker; a worker whose
    current item overruns the timeout (or dies) is replaced and the rest of its chunk resent."""

    STARTUP_S = 60.0  # generous: a loaded 2-core machine can take seconds to import sympy

    def __init__(self, size: int) -> None:
        self.size = size
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()

    def run(self, spec: str, items: list[tuple[int, str, str]], timeout: float) -> dict[int, tuple[str, object]]:
        """{index: ("ok", reward) | ("error", message) | ("timeout", None)} for every item."""
        with self.lock:
            k = min(self.size, len(items))
            if len(self.workers) < k:
                new = [_Worker() for _ in range(k - len(self.workers))]  # start all, then wait: imports overlap
                deadline = time.monotonic() + self.STARTUP_S
                for w in new:
                    w.wait_ready(deadline)
                self.workers += new
            chunk = -(-len(items) // k)
            active = self.workers[:k]
            for j, w in enumerate(active):
                w.submit(spec, items[j * chunk : (j + 1) * chunk])
            out: dict[int, tuple[str, object]] = {}
            while busy := [w for w in active if w.queue]:
                next_deadline = min(w.started for w in busy) + timeout
                wait([w.results for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
                for w in busy:
                    self._collect(w, spec, timeout, out)
            return out

    def _collect(self, w: _Worker, spec: str, timeout: float, out: dict) -> None:
        try:
            while w.queue and w.results.poll():
                i, status, value = w.results.recv()  # one pipe, one item at a time: answers come in order
                w.queue.popleft()
                out[i] = (status, value)
                w.started = time.monotonic()
        except (EOFError, OSError):  # the worker died mid-item (segfault, os._exit, OOM kill)
            out[w.queue.popleft()[0]] = ("error", "reward worker died")
            w.restart(spec, self.STARTUP_S)
            return
        if w.queue and time.monotonic() - w.started >= timeout:
            out[w.queue.popleft()[0]] = ("timeout", None)
            w.restart(spec, self.STARTUP_S)

    def shutdown(self) -> None:
        with self.lock:
            for w in self.workers:
                w.close()
            self.workers = []


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _get_pool(workers: int | None) -> _Pool:
    global _POOL
    size = workers or min(2, os.cpu_count() or 1)
    with _POOL_LOCK:
        if _POOL is None or _POOL.size != size:
            if _POOL is not None:
                _POOL.shutdown()
            _POOL = _Pool(size)
        return _POOL


@atexit.register
def shutdown_pool() -> None:
    """Stop the reward workers (also runs at interpreter exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown()
            _POOL = None
