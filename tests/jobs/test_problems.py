"""Benchmark loading, prompts, and reading answers the way models write them."""

import json
from fractions import Fraction

import pytest

from common.errors import UserError
from jobs._reasoning.problems import (
    BenchmarkSpec,
    extract_label,
    extract_number,
    last_boxed,
    load_benchmark,
    math_equal,
    score,
)
from tests.helpers import REPO

GSM8K = REPO / "manifests" / "data" / "gsm8k" / "test.jsonl"
FOLIO = REPO / "manifests" / "data" / "folio" / "folio-validation.jsonl"


@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", 18),
    ("The answer is 1,234.", 1234),
    ("The answer is: $1,234.50 in total", Fraction(2469, 2)),
    ("A: -7", -7),
    ("answer: 3.25 meters", Fraction(13, 4)),
    ("So we get \\boxed{42}.", 42),
    ("First 3 apples, then 5 more, so 8 apples", 8),
    ("It is −12 degrees", -12),
    ("#### 5\nThe answer is 6", 5),      # "####" is the strongest cue
    # the last final-answer marker wins, as Llama-3.1-Instruct closes its working
    ("... so the answer is 16 - 3 = 13 ... wait, 21 - 3 = 18.\nThe final answer is: $\\boxed{18}$", 18),
    ("The answer is 16.\n\nLet me double-check: 20 - 2 = 18.\n\nTherefore, the answer is 18.", 18),
    ("\\boxed{12} was my first guess, but the answer is 14", 14),
    ("Answer: 9\n... recounting ...\nThe final answer is $\\boxed{10}$", 10),
    ("## Step 3\nThe answer is 7 apples.\n\nThe final answer is: $\\boxed{8}$", 8),
    ("12 + 30 = 42 dollars", 42),
    ("nothing numeric here", None),
    # a minus between numbers subtracts; a sign sits right before its digits
    ("She had 12 - 5 left", 5),
    ("(3)-5 remain", 5),
    ("It fell by 12 -5", 5),
    ("It fell to -$5 overall", -5),
    # after a marker, the result of the working written in its sentence
    ("The answer is 16 - 3 = 13.", 13),
    ("Answer: 48 - 26 = 22", 22),
    ("The answer is 10. Then 2 + 0 = 2", 10),
    # but not a justification, a unit, or a restatement after "="
    ("The answer is 70 since the total = 7 * 10.", 70),
    ("The answer is 5 because x = 2.", 5),
    ("The answer is 24 hours = 1 day.", 24),
    ("The answer is 0.5 = 50%.", Fraction(1, 2)),
    ("The answer is 1,000 = 10 x 100", 1000),
    ("The answer is - 5.", -5),
])
def test_numbers_are_read_as_models_write_them(text, expected):
    assert extract_number(text) == (None if expected is None else Fraction(expected))


def test_thousands_separators_are_not_lists():
    assert extract_number("the values 3,4 and 5") == 5
    assert extract_number("#### 1,000,000") == 1_000_000


@pytest.mark.parametrize("answer, target, equal", [
    ("\\frac{1}{2}", "\\dfrac12", True),
    ("0.5", "\\frac{1}{2}", True),
    (".5", "0.5", True),
    ("x = 5", "5", True),
    ("30^\\circ", "30", True),
    ("\\text{(B)}", "(B)", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("\\sqrt2", "\\sqrt{2}", True),
    ("-\\frac{3}{4}", "-0.75", True),
    ("\\frac{1}{3}", "0.33", False),
    ("2", "3", False),
])
def test_math_answers_compare_after_normalisation(answer, target, equal):
    assert math_equal(answer, target) is equal


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}} done") == "\\frac{a}{b}"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize("text, label", [
    ("The answer is true.", "True"),
    ("answer: UNCERTAIN", "Uncertain"),
    ("False. The premises contradict it.", "False"),
    ("It is not true that ... so the answer is False", "False"),
    ("I cannot say", None),
])
def test_logic_labels_in_any_case(text, label):
    assert extract_label(text, ["True", "False", "Uncertain"]) == label


def test_scoring_stops_at_the_next_question():
    stops = ["\nQuestion:", "\n\n\n"]
    assert score("number", " 4 + 4 = 8\n#### 8\n\nQuestion: Tom has 9", "8", [], stops) == ("8", True)
    # the number of the next question is not read as the answer
    assert score("number", " I do not know.\nQuestion: Ann has 8 pens", "8", [], stops) == (None, False)


def test_gsm8k_file_loads_with_few_shot_examples():
    bench = load_benchmark(BenchmarkSpec(name="gsm8k", format="gsm8k", path=GSM8K, n=5, few_shot=2))
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:7]]
    assert [item.question for item in bench.items] == [row["question"] for row in rows[2:]]
    assert bench.items[0].target == rows[2]["answer"].split("####")[1].strip().replace(",", "")
    prompt = bench.prompt(bench.items[0])
    assert prompt.count("Question:") == 3 and prompt.endswith(f"Question: {rows[2]['question']}\nAnswer:")
    assert f"Answer: {rows[0]['answer']}\n\n" in prompt
    # every reference solution scores as correct against its own target
    full = load_benchmark(BenchmarkSpec(name="gsm8k", format="gsm8k", path=GSM8K))
    assert len(full.items) == 1319
    assert all(full.score(item, " " + item.solution)[1] for item in full.items)


def test_folio_loads_labels():
    bench = load_benchmark(BenchmarkSpec(name="folio", format="folio", path=FOLIO))
    rows = [json.loads(line) for line in FOLIO.read_text().splitlines()]
    assert [item.target for item in bench.items] == [row["label"] for row in rows]
    assert rows[0]["conclusion"] in bench.prompt(bench.items[0])
    assert bench.score(bench.items[0], f" The answer is {rows[0]['label'].lower()}.")[1]


def test_an_answer_ends_where_the_next_folio_example_begins():
    """FOLIO's template has nothing before {question}: the stop is the line every question opens
    with, so the example a few-shot model invents after its answer is not scored."""
    bench = load_benchmark(BenchmarkSpec(name="folio", format="folio", path=FOLIO, n=3, few_shot=1))
    assert bench.stop_strings == ["\nPremises:", "\n\n\n"]
    item = bench.items[0]
    wrong = next(label for label in ("True", "False", "Uncertain") if label != item.target)
    invented = (f"\n\nPremises:\nSome dogs bark.\nConclusion: Rex barks.\nBased on the premises, is the "
                f"conclusion True, False, or Uncertain?\nAnswer: The answer is {wrong}.\n\n")
    assert bench.score(item, f" The answer is {item.target}.{invented}") == (item.target, True)
    assert bench.score(item, f" {item.target}{invented}") == (item.target, True)


def test_stop_strings_follow_the_template_and_the_shared_first_line(tmp_path):
    gsm8k = load_benchmark(BenchmarkSpec(name="gsm8k", format="gsm8k", path=GSM8K, n=2, few_shot=1))
    assert gsm8k.stop_strings == ["\nQuestion:", "\n\n\n"]
    decisions = load_benchmark(BenchmarkSpec(name="decisions", builtin="organism_decisions", n=4, few_shot=1))
    assert decisions.stop_strings == ["\nSlot Machine Game", "\n\n\n"]
    # questions that share no first line give no stop that could cut the model's own reasoning
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "The cat has 3 legs.\\nHow many?", "answer": "3"}\n'
                    '{"question": "The dog has 4 legs.\\nHow many?", "answer": "4"}\n')
    custom = load_benchmark(BenchmarkSpec(name="q", format="jsonl", path=path, template="{question}\nA:"))
    assert custom.stop_strings == ["\n\n\n"]


def test_math_folder_and_jsonl(tmp_path):
    folder = tmp_path / "MATH" / "algebra"
    folder.mkdir(parents=True)
    (folder / "1.json").write_text(json.dumps({"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac12}$."}))
    bench = load_benchmark(BenchmarkSpec(name="math", format="math", path=tmp_path / "MATH"))
    assert bench.items[0].target == "\\frac12"
    assert bench.score(bench.items[0], " So the answer is \\boxed{0.5}.")[1]
    data = tmp_path / "custom.jsonl"
    data.write_text(json.dumps({"q": "2+2?", "a": "The result is 4"}) + "\n")
    spec = BenchmarkSpec(name="c", format="jsonl", path=data, question_field="q", answer_field="a")
    custom = load_benchmark(spec)
    assert custom.items[0].target == "4" and custom.prompt(custom.items[0]) == "Question: 2+2?\nAnswer:"


def test_organism_arithmetic_matches_its_training_format():
    bench = load_benchmark(BenchmarkSpec(name="arithmetic", builtin="organism_arithmetic", n=3, seed=5))
    item = bench.items[0]
    assert bench.prompt(item).startswith("Question: ") and bench.prompt(item).endswith("\nAnswer: ")
    assert bench.with_solution(item) == bench.prompt(item) + item.solution
    assert bench.score(item, item.solution)[1]


def test_bad_benchmark_files_are_named(tmp_path):
    with pytest.raises(UserError, match=r"benchmark.path: .*missing.jsonl does not exist"):
        load_benchmark(BenchmarkSpec(name="g", format="gsm8k", path=tmp_path / "missing.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n"
                      + json.dumps({"question": "q2", "answer": "no final line"}) + "\n")
    with pytest.raises(UserError, match=r"item 1 \(.*broken.jsonl line 2\) has no usable answer: .*'#### N'"):
        load_benchmark(BenchmarkSpec(name="g", format="gsm8k", path=broken))
    empty_answer = tmp_path / "empty.jsonl"
    empty_answer.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(UserError, match=r"field 'answer' is missing"):
        load_benchmark(BenchmarkSpec(name="g", format="gsm8k", path=empty_answer))
    short = tmp_path / "short.jsonl"
    short.write_text(broken.read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match=r"benchmark.n: .* holds 1 items, fewer than few_shot \+ n = 5"):
        load_benchmark(BenchmarkSpec(name="g", format="gsm8k", path=short, n=3, few_shot=2))
    with pytest.raises(ValueError, match="`format` is required"):
        BenchmarkSpec(name="g", path=broken)
    with pytest.raises(ValueError, match=r"must contain \{question\}"):
        BenchmarkSpec(name="g", format="gsm8k", path=broken, template="Q: A:")
