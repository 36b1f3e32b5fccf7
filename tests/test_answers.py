"""Answer extraction and scoring on responses like the ones models give."""
import pytest

from peft_ext import answers
from peft_ext.errors import UsageError

SVAMP = answers.get("SVAMP")
AQUA = answers.get("AQuA")
BOOLQ = answers.get("boolq")


@pytest.mark.parametrize(
    "response, number",
    [
        ("Tom has 3 + 5 = 8 apples. The answer is 8.", 8.0),
        ("The temperature fell to -12 degrees. The answer is -12.", -12.0),
        ("Each costs 0.25 dollars, so 4 cost 1.00. The answer is 1.0", 1.0),
        ("There are 1,000 seats in all. The answer is 1,000.", 1000.0),
        ("She pays $1,234.50 in total.", 1234.5),
        ("He walks 12 km", 12.0),
        ("The answer is 45%.", 45.0),
        ("It takes 3 hours.\n\n", 3.0),
        ("I do not know.", None),
        ("", None),
        ("She had 12 - 4 = 8 left", 8.0),
        ("Half of it: 1/2", 2.0),  # the reference's rule: the last number, so a fraction reads as its denominator
    ],
)
def test_last_number(response, number):
    assert answers.last_number(response) == number


def test_number_scoring_tolerance_and_labels():
    assert SVAMP.is_correct(8.0, "8.0")
    assert SVAMP.is_correct(1.8333, "1.8333333333333335")  # MAWPS labels: three decimals are enough
    assert not SVAMP.is_correct(1.83, "1.8333333333333335")
    assert SVAMP.is_correct(-15.0, "-15.0")
    assert not SVAMP.is_correct(None, "8")
    assert SVAMP.is_correct(SVAMP.extract("The answer is 1,000."), "1000")
    assert SVAMP.is_correct(1000.0, "1,000") and SVAMP.check_answer("1,000") is None  # a data file's "1,000"


@pytest.mark.parametrize(
    "response, strict, paper",
    [
        ("Rationale: 20% of 50 is 10. The answer is (C).", "C", "C"),
        ("A train covers 60 km in 1 hour. The answer is (B).", "B", "A"),  # the article "A"
        ("Each bag holds 5. So the answer is D", "D", "E"),  # "Each" starts with a capital E
        ("Bob and Dan share it equally. (E)", "E", "B"),
        ("The answer is: a", None, None),  # a lowercase letter is not an option
        ("The answer is A train", None, "A"),  # an article after "answer is" is not an answer
        ("The answer is C because 5 > 3.", "C", "C"),  # only "A" can be an article: C is the answer
        ("The answer is A because the rate doubles.", "A", "A"),
        ("The answer is B and not A.", "B", "B"),
        ("It is (A) or maybe (D).", "D", "A"),  # no "answer is": the last option letter
        ("The answer is (B). Check: option E) is too big.", "B", "B"),  # "answer is" wins over later letters
        ("A long computation without a conclusion", None, "A"),
        ("the speed is 40 km per hour", None, None),
        ("C", "C", "C"),
    ],
)
def test_aqua_rules(response, strict, paper):
    assert answers.option_letter(response, "strict") == strict
    assert answers.option_letter(response, "paper") == paper
    assert AQUA.extract(response, "paper") == paper


def test_labels_first_allowed_word_case_sensitive():
    assert BOOLQ.extract("the correct answer is false") == "false"
    assert BOOLQ.extract("true, not false") == "true"
    assert BOOLQ.extract("True") is None  # the reference's patterns are case-sensitive
    assert answers.get("piqa").extract("the correct answer is solution2") == "solution2"
    assert answers.get("ARC-c").extract("answer4 is right, not answer1") == "answer4"
    assert answers.get("winogrande").extract("option1") == "option1"
    assert answers.get("hellaswag").extract("ending3.") == "ending3"
    assert answers.get("openbookqa").extract("I cannot tell") is None
    assert BOOLQ.is_correct("false", "false") and not BOOLQ.is_correct("true", "false")


def test_every_paper_name_resolves():
    for spelling, name in [("gsm8k", "gsm8k"), ("GSM8K", "gsm8k"), ("svamp", "SVAMP"), ("SIQA", "social_i_qa"),
                           ("social_i_qa", "social_i_qa"), ("ARC-e", "ARC-Easy"), ("arc-challenge", "ARC-Challenge"),
                           ("OBQA", "openbookqa"), ("MAWPS", "mawps"), ("BoolQ", "boolq"), ("HellaSwag", "hellaswag")]:
        assert answers.get(spelling).name == name
    assert [answers.get(n).kind for n in answers.SUITES["math"]].count("number") == 6
    assert {answers.get(n).max_new_tokens for n in answers.SUITES["commonsense"]} == {32}
    assert {answers.get(n).max_new_tokens for n in answers.SUITES["math"]} == {256}


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UsageError, match="unknown dataset 'svamp2'.*SVAMP.*commonsense"):
        answers.get("svamp2")
    with pytest.raises(UsageError, match="answer_rule"):
        answers.check_rule("first")
    assert answers.check_rule(" Paper") == "paper"  # any case, as dataset names


def test_infer_kind_of_an_unknown_set():
    assert answers.infer("mine", ["3", "4.5", -2]).kind == "number"
    assert answers.infer("mine", ["A", "C"]).kind == "letter"
    assert answers.infer("mine", ["AB", "C"]).kind == "label"
    assert answers.infer("mine", ["1,000", "12"]).kind == "number"
    assert answers.infer("mine", ["", "yes"]).check_answer("") == "its answer is empty"  # it would match anything
    labels = answers.infer("mine", ["answer1", "answer10", "answer2"])
    assert labels.kind == "label" and labels.extract("answer10") == "answer10"
