"""Dataset loading: every format, the field mapping, and one-line file:line errors for each kind of bad input."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stablerl.data import DataError, Example, load_examples, load_hf, write_jsonl
from stablerl.errors import UserError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_with_field_mapping_numbers_meta_and_blank_lines(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"q": "1+1", "a": 2, "src": "x"}\n\n{"q": "2*3", "a": "6"}\n   \n')
    ex = load_examples(p, prompt_key="q", answer_key="a")
    assert ex == [Example("1+1", "2", {}, {"src": "x"}), Example("2*3", "6")]


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    arr = _write(tmp_path / "a.json", '[\n  {"prompt": "p1", "answer": "1"},\n  {"prompt": "p2", "answer": 2.5}\n]\n')
    assert [(e.prompt, e.answer) for e in load_examples(arr)] == [("p1", "1"), ("p2", "2.5")]
    lines = _write(tmp_path / "l.json", '{"prompt": "p", "answer": "a"}\n')
    assert load_examples(lines)[0].answer == "a"
    with pytest.raises(DataError, match="e.json: no records$"):
        load_examples(_write(tmp_path / "e.json", " [ ]\n"))


def test_csv_with_quoted_multiline_field(tmp_path):
    p = _write(tmp_path / "d.csv", 'prompt,answer\n"two\nlines",5\nplain,-3\n')
    assert [(e.prompt, e.answer) for e in load_examples(p)] == [("two\nlines", "5"), ("plain", "-3")]


def test_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["a", "b"], "answer": [1, 2], "level": [3, 4]}), p)
    ex = load_examples(p, prompt_key="question")
    assert ex == [Example("a", "1", {}, {"level": 3}), Example("b", "2", {}, {"level": 4})]


def test_write_jsonl_round_trips_task_examples(tmp_path):
    traces = {"long": "1+2=3\nAnswer: 3", "answer": "Answer: 3"}
    ex = [Example("Q: 1+2\n", "3", traces, {"task": "arith", "key": "1+2"})]
    assert load_examples(write_jsonl(tmp_path / "sub" / "t.jsonl", ex)) == ex


# (file name, content, expected one-line error): each names the file and the line the bad record is on.
BAD = [
    ("m.jsonl", '{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n{"prompt": "c", "foo": 1}\n',
     "m.jsonl:2: field 'answer' missing (fields present: prompt)"),
    ("m2.jsonl", '{"prompt": "a", "answer": "1"}\n\n{"prompt": "c", "foo": 1}\n',
     "m2.jsonl:3: field 'answer' missing (fields present: prompt, foo)"),
    ("t.jsonl", '{"prompt": ["a", "b"], "answer": "1"}\n', "t.jsonl:1: field 'prompt' must be a string or number, "
     "got list ['a', 'b']"),
    ("b.jsonl", '{"prompt": "a", "answer": true}\n', "b.jsonl:1: field 'answer' must be a string or number, got bool"),
    ("n.jsonl", '{"prompt": "a", "answer": null}\n', "n.jsonl:1: field 'answer' null (fields present: prompt)"),
    ("e.jsonl", '{"prompt": "  ", "answer": "1"}\n', "e.jsonl:1: field 'prompt' is empty"),
    ("j.jsonl", '{"prompt": "a", "answer": "1"}\n{"prompt": "a" "answer": "1"}\n',
     "j.jsonl:2: invalid JSON: Expecting ',' delimiter (column 16)"),
    ("r.jsonl", '["a", "1"]\n', "r.jsonl:1: record must be an object with fields, got list"),
    ("tr.jsonl", '{"prompt": "a", "answer": "1", "traces": ["x"]}\n', "tr.jsonl:1: field 'traces' must map style"),
    ("empty.jsonl", "", "empty.jsonl: no records (empty file)"),
    ("blank.jsonl", "\n\n", "blank.jsonl: no records"),
    ("a.json", '[\n {"prompt": "a", "answer": "1"},\n {"prompt": "b",\n  "ans": "2"}\n]',
     "a.json:3: field 'answer' missing (fields present: prompt, ans)"),
    ("c.json", '[\n {"prompt": "a", "answer": "1"}\n {"prompt": "b"}]', "c.json:3: invalid JSON: expected ','"),
    ("h.csv", "prompt,solution\na,1\n", "h.csv:1: column 'answer' missing (columns: prompt, solution)"),
    ("s.csv", 'prompt,answer\na,1\n"multi\nline",2\nb\n', "s.csv:5: field 'answer' missing (fields present: prompt)"),
    ("x.csv", "prompt,answer\na,1,extra\n", "x.csv:2: 3 fields but the header has 2"),
    ("v.csv", "prompt,answer\na,\n", "v.csv:2: field 'answer' is empty"),
    ("o.csv", "prompt,answer\n", "o.csv: no records"),
    ("f.txt", "prompt\n", "f.txt: unknown data format '.txt'"),
]


@pytest.mark.parametrize("name,content,error", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gives_one_line_file_line_error(tmp_path, name, content, error):
    p = _write(tmp_path / name, content)
    with pytest.raises(DataError) as e:
        load_examples(p)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / error)), msg  # the path as given, then :line: and the problem
    assert "\n" not in msg
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)  # the CLI prints these, exit 2


def test_unreadable_inputs(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"^{missing}: cannot read: no such file$"):
        load_examples(missing)
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    for name in ("l.jsonl", "l.json", "l.csv"):  # line by line (JSONL) or whole file: same line and column
        (tmp_path / name).write_bytes(latin.read_bytes())
        with pytest.raises(DataError, match=name + r":2: not UTF-8 text \(invalid continuation byte at column 16\)$"):
            load_examples(tmp_path / name)
    junk = tmp_path / "j.parquet"
    junk.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match=r"j.parquet: cannot read as Parquet: ") as e:
        load_examples(junk)
    assert "\n" not in str(e.value)
    nulls = tmp_path / "n.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", None]}), nulls)
    with pytest.raises(DataError, match=r"n.parquet:row 2: field 'answer' null \(fields present: prompt\)$"):
        load_examples(nulls)
    with pytest.raises(DataError, match="column 'answer' missing"):
        pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "c.parquet")
        load_examples(tmp_path / "c.parquet")
    good = _write(tmp_path / "g.jsonl", '{"prompt": "a", "answer": "1"}\n')
    with pytest.raises(DataError, match="only the 'train' split, not 'test'"):
        load_examples(good, split="test")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path):
    p = _write(tmp_path / "p.jsonl", '{"prompt": "a", "answer": "1"}\n')
    p.chmod(0)
    with pytest.raises(DataError, match="p.jsonl: cannot read: Permission denied"):
        load_examples(p)


def test_load_hf_on_local_files(tmp_path):
    rows = [{"question": f"q{i}", "target": i} for i in range(3)]
    src = write_jsonl(tmp_path / "hf.jsonl", rows)
    assert [(e.prompt, e.answer) for e in load_hf(src, "train", "question", "target")] == [
        ("q0", "0"), ("q1", "1"), ("q2", "2")]
    with pytest.raises(DataError, match=r"hf.jsonl: column 'answer' missing \(columns: question, target\)"):
        load_hf(src, "train", "question", "answer")
    with pytest.raises(DataError, match="hf.jsonl: cannot load with datasets: ") as e:
        load_hf(src, "validation", "question", "target")
    assert "\n" not in str(e.value)
    # a directory goes through datasets too, from load_examples
    (tmp_path / "dir").mkdir()
    pq.write_table(pa.table({"prompt": ["a"], "answer": ["b"], "x": [json.dumps({"k": 1})]}),
                   tmp_path / "dir" / "train.parquet")
    assert load_examples(tmp_path / "dir") == [Example("a", "b", {}, {"x": '{"k": 1}'})]
