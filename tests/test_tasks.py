"""Built-in tasks: exact trace formats, true scratchpads, disjoint deterministic splits, reward 1 for every trace."""

import re
from functools import cache

import pytest

from stablerl.errors import UserError
from stablerl.rewards import eval_countdown, extract_answer, score
from stablerl.tasks import TASKS, TRACE_STYLES, arith, countdown, get_task, linear
from stablerl.tokenizer import CHARS


class Script:
    """Stands in for random.Random, replaying scripted draws, so a test can pin one exact problem."""

    def __init__(self, ints=(), floats=(), picks=(), pairs=()):
        self.ints, self.floats, self.picks, self.pairs = list(ints), list(floats), list(picks), list(pairs)

    def randint(self, lo, hi):
        v = self.ints.pop(0)
        assert lo <= v <= hi
        return v

    def random(self):
        return self.floats.pop(0)

    def choice(self, seq):
        v = self.picks.pop(0)
        assert v in seq
        return v

    def sample(self, population, k):
        return list(self.pairs.pop(0))


def test_arith_traces_exactly():
    p = arith(Script(ints=[374, 485]), digits=3, n_terms=2).example("arith")
    assert p.prompt == "Q: 374+485\n" and p.answer == "859"
    assert p.traces == {"long": "4+5=9\n7+8=15\n3+4+1=8\nAnswer: 859", "short": "9,15,8\nAnswer: 859",
                        "answer": "Answer: 859"}
    # subtraction: signed column values, a negative one is a borrow (2-7=-5: digit 5, carry -1)
    p = arith(Script(ints=[37, 52]), digits=2, n_terms=2, op="-").example("arith")
    assert p.prompt == "Q: 52-37\n"
    assert p.traces["long"] == "2-7=-5\n5-3-1=1\nAnswer: 15"
    p = arith(Script(ints=[99, 99, 99]), digits=2, n_terms=3).example("arith")
    assert p.traces["long"] == "9+9+9=27\n9+9+9+2=29\nAnswer: 297"


def test_linear_traces_exactly():
    # a=-4 (randint 4, random < .5 flips sign), b=-9, x=-5: c = 20 - 9 = 11
    p = linear(Script(ints=[4, 9, -5], floats=[0.1, 0.2])).example("linear")
    assert p.prompt == "Q: -4x-9=11\n" and p.answer == "-5"
    assert p.traces == {"long": "-4x=11+9\n-4x=20\nx=20/-4\nAnswer: -5", "short": "-4x=20\nAnswer: -5",
                        "answer": "Answer: -5"}
    p = linear(Script(ints=[1, 3, 7], floats=[0.9, 0.9])).example("linear")  # a = 1: no division step
    assert p.prompt == "Q: x+3=10\n" and p.traces["long"] == "x=10-3\nx=7\nAnswer: 7"
    p = linear(Script(ints=[1, 3, 7], floats=[0.1, 0.9])).example("linear")  # a = -1
    assert p.prompt == "Q: -x+3=-4\n" and p.traces["long"] == "-x=-4-3\n-x=-7\nx=7\nAnswer: 7"


def test_countdown_traces_exactly():
    # numbers 3 4 6 8; combine 8-6, then 2*3 (pool is [3, 4, 2]: indices 2, 0), then 6*4
    rng = Script(ints=[3, 4, 6, 8], picks=["-", "*", "*"], pairs=[(3, 2), (2, 0), (1, 0)])
    p = countdown(rng).example("countdown")
    assert p.prompt == "Q: 24 from 3 4 6 8\n" and p.answer == "24:3,4,6,8"
    assert p.traces == {"long": "8-6=2\n2*3=6\n6*4=24\nAnswer: (8-6)*3*4", "short": "(8-6)*3*4=24\nAnswer: (8-6)*3*4",
                        "answer": "Answer: (8-6)*3*4"}


# add_qa's 2-digit sums have ~3,600 distinct train problems (a+b is b+a): its own default size
N_TRAIN = {"add_qa": 2000}


@cache
def _splits(name):
    task = get_task(name)
    return task, task.train(N_TRAIN.get(name, 4096)), task.heldout()


@pytest.mark.parametrize("name", TASKS)
def test_default_split_sizes_disjoint_and_deterministic(name):
    task, train, held = _splits(name)
    n = N_TRAIN.get(name, 4096)
    assert (len(train), len(held)) == (n, 256)
    keys_tr, keys_ho = {e.meta["key"] for e in train}, {e.meta["key"] for e in held}
    assert len(keys_tr) == n and len(keys_ho) == 256  # no repeats within a split
    assert not keys_tr & keys_ho and not {e.prompt for e in train} & {e.prompt for e in held}
    assert {task.split_of(k) for k in keys_tr} == {"train"} and {task.split_of(k) for k in keys_ho} == {"heldout"}
    assert task.train(50) == train[:50]  # same seed, same problems, in order
    other = task.train(300, seed=1)
    assert [e.prompt for e in other] != [e.prompt for e in train[:300]]
    assert not {e.meta["key"] for e in other} & keys_ho  # any seed stays out of the held-out set


@pytest.mark.parametrize("name", TASKS)
def test_every_trace_style_earns_reward_one(name):
    task, train, held = _splits(name)
    examples = train + held
    for style in TRACE_STYLES:
        traces = [e.traces[style] for e in examples]
        res = score(traces, [e.answer for e in examples], fn=task.reward)
        assert res.rewards == [1.0] * len(examples) and res.n_errors == res.n_timeouts == 0, style
        assert all(t.rsplit("\n", 1)[-1].startswith("Answer: ") for t in traces)


@pytest.mark.parametrize("name", TASKS)
def test_char_model_budget(name):
    # The default model's tokenizer knows only printable ASCII and newline; short sequences keep CPU runs fast.
    _, train, held = _splits(name)
    allowed = set(CHARS)
    for e in train + held:
        assert set(e.prompt + e.answer + "".join(e.traces.values())) <= allowed
        assert len(e.prompt) <= 24 and len(e.traces["long"]) <= 60
        assert len(e.traces["answer"]) < len(e.traces["short"]) <= len(e.traces["long"])


def _signed_sum(expr):
    return sum(int(t) for t in re.findall(r"[+-]?\d+", expr))


def test_scratchpad_lines_are_true():
    for knobs in ({}, {"digits": 3, "n_terms": 2}, {"digits": 2, "op": "-"}, {"digits": 3, "n_terms": 3, "op": "-"}):
        for e in get_task("arith", **knobs).train(200):
            *lines, last = e.traces["long"].split("\n")
            assert len(lines) == knobs.get("digits", 4)
            for line in lines:
                lhs, rhs = line.split("=")
                assert _signed_sum(lhs) == int(rhs), line
            terms = [int(t) for t in re.findall(r"\d+", e.prompt)]
            assert int(e.answer) == (terms[0] - sum(terms[1:]) if "-" in e.prompt else sum(terms)) >= 0
    for e in get_task("linear").train(200):
        a, b, c = re.fullmatch(r"Q: (-?\d*)x([+-]\d+)=(-?\d+)\n", e.prompt).groups()
        a = {"": 1, "-": -1}.get(a, None) or int(a)
        assert a * int(e.answer) + int(b) == int(c)
    for e in get_task("countdown").train(200):
        target, numbers = e.answer.split(":")
        nums = [int(n) for n in numbers.split(",")]
        *steps, _ = e.traces["long"].split("\n")
        for step in steps:
            lhs, rhs = step.split("=")
            assert eval_countdown(lhs, [int(n) for n in re.findall(r"\d+", lhs)]) == int(rhs), step
        assert eval_countdown(extract_answer(e.traces["long"]), nums) == int(target)
        assert int(target) not in nums and 1 <= int(target) <= 100


def test_knobs_change_difficulty_and_bad_knobs_fail_on_one_line():
    easy = get_task("arith", digits=2, n_terms=2).train(10)
    assert all(len(e.answer) in (2, 3) and e.prompt.count("+") == 1 for e in easy)
    assert str(get_task("arith")) == "arith(digits=4, n_terms=3, op='+')"
    assert str(get_task("countdown", n_numbers=3)) == "countdown(n_numbers=3, max_number=10, ops='+-*', target_max=100)"
    div = get_task("countdown", ops="/*", n_numbers=3).train(50)
    assert any("/" in e.traces["answer"] for e in div)
    for args, kwargs, msg in [
        (("sudoku",), {}, "unknown task 'sudoku' (available: arith, linear, countdown, add_qa)"),
        (("arith",), {"digit": 2}, "task arith: unknown knob 'digit' (knobs: digits, n_terms, op)"),
        (("arith",), {"digits": 0}, "task arith: digits must be an integer in 1..9, got 0"),
        (("arith",), {"op": "-", "n_terms": 9}, "task arith: op '-' with n_terms=9, digits=4 rarely has a result"),
        (("linear",), {"negative": "yes"}, "task linear: negative must be true or false, got 'yes'"),
        (("countdown",), {"ops": "-"}, "task countdown: ops must be a string over '+-*/' containing '+' or '*'"),
    ]:
        with pytest.raises(UserError) as e:
            get_task(*args, **kwargs)
        assert str(e.value).startswith(msg) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"found only \d+ distinct train problems, asked for 100"):
        get_task("arith", digits=1, n_terms=2).train(100)  # 55 unordered pairs in all
