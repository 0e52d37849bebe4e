"""Verifiers: extraction, the verify modes, countdown, and score()'s isolation of failing reward functions."""

import math
import os
import time
from pathlib import Path

import pytest

from stablerl import rewards
from stablerl.rewards import (
    countdown_reward,
    eval_countdown,
    extract_answer,
    math_reward,
    parse_number,
    register_reward,
    resolve_reward,
    score,
    verify,
)

# (completion, reference answer, expected reward under the default "math" function)
MATH_TABLE = [
    # plain answers, the built-in tasks' trace format
    ("Answer: 85", "85", 1.0),
    ("7+8=15\n3+4+1=8\nAnswer: 85", "85", 1.0),
    ("7+8=15\n3+4+1=8\nAnswer: 86", "85", 0.0),
    ("Answer: 85.", "85", 1.0),
    ("**Answer:** 85", "85", 1.0),
    ("Answer: 85\nAnswer: 86", "86", 1.0),  # the last answer counts
    ("Answer: 007", "7", 1.0),
    ("Answer: 3.0", "3", 1.0),
    # negatives
    ("x=20/-4\nAnswer: -5", "-5", 1.0),
    ("Answer: 5", "-5", 0.0),
    ("so x = -7", "-7", 1.0),  # final-number fallback keeps a leading minus
    ("10-4", "-4", 0.0),  # ...but not a binary one: the last number is 4
    # fractions and decimals
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("Answer: 1/2", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{-3}{4}}", "-0.75", 1.0),
    ("\\boxed{-\\frac{3}{4}}", "-3/4", 1.0),
    ("Answer: 0.333", "1/3", 0.0),  # 1e-3 off: far outside the 1e-6 tolerance
    ("Answer: 0.3333333333", "1/3", 1.0),  # 3e-11 off: inside it
    ("Answer: 0.5000011", "0.5", 0.0),  # 1.1e-6 off: just outside
    # LaTeX, boxed, thousands, units, percent
    ("The result is \\boxed{42}.", "42", 1.0),
    ("Answer: $1,234$", "1234", 1.0),
    ("Answer: 12 cm", "12", 1.0),
    ("\\boxed{12\\text{ cm}}", "12", 1.0),
    ("Answer: 50\\%", "50", 1.0),
    ("Answer: 90^\\circ", "90", 1.0),
    ("Answer: x = 3", "3", 1.0),
    ("Answer: 2 pi", "2", 0.0),  # pi is not a unit
    # symbolic equivalence through math-verify
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{\\pi}", "2\\pi", 0.0),
    ("\\boxed{2\\pi}", "2\\pi", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    # malformed output
    ("", "5", 0.0),
    ("no idea", "5", 0.0),
    ("Answer:", "5", 0.0),
    ("Answer: \n5", "5", 0.0),  # a declared but empty answer is not rescued by a later number
    ("\\boxed{", "5", 0.0),
    ("\\boxed{6 and then 5", "5", 1.0),  # unclosed box: falls back to the last number
    ("Answer: five", "5", 0.0),
    ("Answer: \u221e\u221e", "5", 0.0),
    ("9" * 5000, "9", 0.0),  # past Python's int-string limit: no crash, no hang
]


def test_table_has_at_least_30_cases():
    assert len(MATH_TABLE) >= 30


@pytest.mark.parametrize("completion,answer,expected", MATH_TABLE)
def test_math_reward_table(completion, answer, expected):
    assert math_reward(completion, answer) == expected


def test_score_agrees_with_math_reward_on_the_whole_table():
    # score() decides most rows in-process and sends the rest to workers; the split must not change a reward.
    res = score([c for c, _, _ in MATH_TABLE], [a for _, a, _ in MATH_TABLE])
    assert res.rewards == [e for _, _, e in MATH_TABLE]
    assert (res.n_errors, res.n_timeouts) == (0, 0)


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{1} then \\boxed{\\frac{2}{3}}", "\\frac{2}{3}"),
    ("\\fbox{7}", "7"),
    ("Final answer: 12", "12"),
    ("answer: -3 \nmore text 9", "-3"),
    ("a 1,234 b", "1,234"),
    ("3x=15\nx=5", "5"),
    ("(8-6)*3*4=24", "24"),
    ("nothing numeric", None),
    ("\\boxed{}", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_parse_number():
    assert parse_number("-1,234.5") == -2469 / 2
    assert parse_number("\\frac{-3}{4}") == -0.75
    assert parse_number("$x = 7$") == 7
    assert parse_number("3/0") is None
    assert parse_number("1e5") is None  # exponents go to math-verify: 1e999999999 must not be built in-process
    assert parse_number("2x") is None


def test_verify_modes():
    assert verify("1/2", "0.5", mode="exact") == 0.0
    assert verify(" 1/2 ", "1/2", mode="exact") == 1.0
    assert verify("1/2", "0.5", mode="numeric") == 1.0
    assert verify("\\sqrt{4}", "2", mode="numeric") == 0.0  # not a plain number: numeric alone cannot tell
    assert verify("\\sqrt{4}", "2", mode="math") == 1.0
    assert verify("\\sqrt{4}", "2", mode="auto") == 1.0
    assert verify("1.001", "1", mode="numeric", rel_tol=1e-2) == 1.0
    assert verify(None, "1") == 0.0
    with pytest.raises(ValueError, match="verify mode 'fuzzy' unknown"):
        verify("1", "1", mode="fuzzy")


CD = "24:3,4,6,8"


@pytest.mark.parametrize("completion,expected", [
    ("8-6=2\n2*3=6\n6*4=24\nAnswer: (8-6)*3*4", 1.0),
    ("Answer: 8*3", 1.0),  # each number at most once: a subset is a valid solution
    ("Answer: 3*8=24", 1.0),
    ("Answer: 6/(3/4)*8/8", 0.0),  # 8 used twice
    ("Answer: 8/(3-3)", 0.0),  # 3 used twice, and division by zero
    ("Answer: 8/(4-3)*3", 0.0),  # 3 used twice
    ("Answer: 24", 0.0),  # 24 is not one of the numbers
    ("Answer: 8*3*1", 0.0),
    ("Answer: 3**3-3", 0.0),  # no powers
    ("Answer: -3+27", 0.0),  # no unary minus
    ("Answer: __import__('os').getpid()", 0.0),  # never evaluated as Python
    ("Answer: (8-6)*3*", 0.0),
    ("no answer", 0.0),
])
def test_countdown_reward(completion, expected):
    assert countdown_reward(completion, CD) == expected


def test_eval_countdown_is_exact():
    assert eval_countdown("8/3*3", [3, 3, 8]) == 8  # exact rationals: no 7.999999
    assert eval_countdown("8/3", [3, 8]) * 3 == 8
    assert eval_countdown("1+" * 60 + "1", [1] * 61) is None  # over the length bound
    assert countdown_reward("Answer: 8/(4-3)*3", "24:3,3,4,8") == 1.0  # a number given twice may be used twice


# ---- registry and isolation -----------------------------------------------------------------------------------


def always_half(completion: str, answer: str) -> float:
    return 0.5


def flaky(completion: str, answer: str) -> float:
    """Test reward that misbehaves on request: raise, hang, return NaN, kill its own process."""
    if completion == "raise":
        raise RuntimeError("boom\nsecond line")
    if completion == "hang":
        time.sleep(60)
    if completion == "nan":
        return math.nan
    if completion == "die":
        os._exit(3)
    return float(completion == answer)


def test_user_function_by_import_path_and_registration():
    res = score(["a", "b"], ["a", "a"], fn="test_rewards:flaky")
    assert res.rewards == [1.0, 0.0] and res.n_errors == 0
    register_reward("half", always_half)
    try:
        assert score(["x"] * 3, ["y"] * 3, fn="half").rewards == [0.5] * 3
        assert score(["x"], ["y"], fn=always_half).rewards == [0.5]
    finally:
        del rewards.REWARDS["half"]


def test_bad_reward_specs_fail_fast_with_one_line():
    for fn, msg in [("nope", "reward 'nope' unknown"), ("no_such_module_xyz:f", "cannot be loaded"),
                    ("test_rewards:missing", "cannot be loaded"), ("test_rewards:CD", "not callable")]:
        with pytest.raises(ValueError, match=msg) as e:
            score(["1"], ["1"], fn=fn)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not importable"):
        score(["1"], ["1"], fn=lambda c, a: 1.0)
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        score(["1", "2"], ["1"])


def _zombie_children() -> list[int]:
    me, zombies = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == me:
            zombies.append(int(stat.parent.name))
    return zombies


def test_raise_nan_hang_and_death_score_zero_and_are_counted():
    completions = ["ok", "raise", "ok", "nan", "hang", "ok", "die", "ok"]
    t0 = time.monotonic()
    res = score(completions, ["ok"] * len(completions), fn="test_rewards:flaky", timeout=0.5, workers=2)
    assert res.rewards == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]  # the items after each failure still ran
    assert (res.n_errors, res.n_timeouts) == (3, 1)  # raise, nan, die | hang
    assert res.first_error == "RuntimeError: boom second line"
    assert time.monotonic() - t0 < 30  # the hang (60 s) was cut, not waited out
    if Path("/proc/self/stat").exists():
        assert _zombie_children() == []  # killed workers were reaped


def test_math_verify_hang_is_killed_by_the_timeout():
    # sympy expands 10^9999999 for minutes: the real verifier hangs on this, and only the kill saves the step.
    res = score(["Answer: 10^{9999999}", "Answer: 7"], ["1", "7"], timeout=0.5)
    assert res.rewards == [0.0, 1.0] and res.n_timeouts == 1


def test_plain_numeric_answers_never_touch_the_pool(monkeypatch):
    def no_pool(workers):
        raise AssertionError("pool used")

    monkeypatch.setattr(rewards, "_get_pool", no_pool)
    res = score(["Answer: 85", "1+1=2\nAnswer: -3", "Answer: 1/2", "junk"] * 64, ["85", "-3", "0.5", "4"] * 64)
    assert res.rewards == [1.0, 1.0, 1.0, 0.0] * 64


def test_shutdown_reaps_workers():
    score(["\\boxed{\\sqrt{4}}"], ["2"])  # needs math-verify: starts the pool
    procs = [w.proc for w in rewards._POOL.workers]
    assert procs
    rewards.shutdown_pool()
    assert all(p.returncode is not None for p in procs)
    assert rewards._POOL is None
    assert resolve_reward("math") is math_reward
