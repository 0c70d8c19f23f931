"""Math answers: extraction rules, exact number parsing, equivalence, and the math_answer reward."""

import time
from fractions import Fraction

import pytest

from rlhf_jax.rewards import (answers_equal, extract_answer, math_answer, math_answer_column,
                              parse_number)

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
                  "#### 72")


def score(completions, answers):
  return math_answer(["question"] * len(completions), completions, answer=answers)


# --- extract_answer -------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (GSM8K_SOLUTION, "72"),
    ("She earns 1000 + 234 dollars.\n#### 1,234", "1,234"),
    ("first #### 5 then\n#### 6", "6"),  # the last ####
    ("So the result is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("\\boxed{1} at first, but finally \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}",
     "\\left(3, \\frac{\\pi}{2}\\right)"),
    ("the set is \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
    ("\\fbox{7}", "7"),
    ("6 apples minus 2. The answer is 12.", "12"),
    ("The answer is 3.5. Then we check 4.", "3.5"),
    ("The answer is $1,000, which is a lot", "$1,000"),
    ("**Final Answer:** 42", "42"),
    ("Answer: -7", "-7"),
    ("I think 3 + 4 = 7, and then 7 * 2 = 14", "14"),  # last number
    ("The total is 1,234 eggs.", "1,234"),
    ("Half: \\frac{1}{2}", "\\frac{1}{2}"),
    ("It is -2.5 degrees", "-2.5"),
    ("x-3 becomes 2", "2"),
    ("  0.5  ", "0.5"),
])
def test_extract_answer(text, expected):
  assert extract_answer(text) == expected


def test_extract_answer_priority():
  # A box beats an earlier phrase and later numbers; #### beats a box.
  assert extract_answer("The answer is 13. Hmm, no: \\boxed{12}. Check: 13") == "12"
  assert extract_answer("\\boxed{5}\n#### 6") == "6"
  # The last phrase wins: models correct themselves.
  assert extract_answer("The answer is 5. Wait, no: the answer is 6.") == "6"
  # An answer tag restricts the search to its content.
  assert extract_answer("I considered 5.\n<answer>\\boxed{3}</answer> then 9") == "3"
  assert extract_answer("<think>2+2 is 4</think><answer>The answer is 4.</answer>") == "4"
  assert extract_answer("<think>pi over 2</think><answer>\\frac{\\pi}{2}</answer>") == \
      "\\frac{\\pi}{2}"


def test_extract_answer_skips_what_is_not_an_answer():
  # A markdown heading is not GSM8K's "####" line.
  assert extract_answer("#### Step 1\nWe add 3 and 4 to get 7.") == "7"
  assert extract_answer("The box \\boxed{ is never closed, 8") == "8"
  assert extract_answer("To answer this, note 5 apples and 6 pears") == "6"  # no "is" / ":"
  assert extract_answer("no numbers at all") is None
  assert extract_answer("") is None
  assert extract_answer([{"role": "assistant", "content": "#### 9"}]) == "9"


# --- parse_number ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("72", 72), ("-3", -3), ("+3", 3), ("3.50", Fraction(7, 2)), (".5", Fraction(1, 2)),
    ("-.25", Fraction(-1, 4)), ("3/4", Fraction(3, 4)), ("-3/4", Fraction(-3, 4)),
    ("\\frac{3}{4}", Fraction(3, 4)), ("\\dfrac{3}{4}", Fraction(3, 4)),
    ("\\tfrac{3}{4}", Fraction(3, 4)), ("-\\frac12", Fraction(-1, 2)),
    ("\\frac{-1}{2}", Fraction(-1, 2)), ("\\frac{1.5}{3}", Fraction(1, 2)),
    ("1,000", 1000), ("12,345.6", Fraction(123456, 10)), ("1,000,000", 10**6),
    ("1{,}000", 1000), ("1\\,000", 1000), ("1\\!000", 1000),
    ("$1,000", 1000), ("-$5", -5), ("$-5", -5), ("\\$18", 18), ("18 USD", 18), ("\u20ac7", 7),
    ("72 dollars", 72), ("5 km/h", 5), ("\\frac{1}{2} cup", Fraction(1, 2)),
    ("50%", 50), ("50\\%", 50), ("90^\\circ", 90), ("90^{\\circ}", 90),
    ("$12$", 12), ("$$12$$", 12), ("\\(12\\)", 12), ("\\[12\\]", 12), ("\\text{12}", 12),
    ("12\\text{ cm}", 12), ("12.", 12), ("**12**", 12), ("x = 5", 5), ("1e3", 1000),
    ("0.1", Fraction(1, 10)),
])
def test_parse_number(text, expected):
  assert parse_number(text) == expected


@pytest.mark.parametrize("text", [
    "1,5", "1000,000", "12 or 13", "2x", "1 1/2", "3/0", "\\frac{1}{0}", "abc", "", "   ",
    "\\sqrt{2}", "1e99999", "1.2.3", "$", "-",
])
def test_parse_number_rejects(text):
  assert parse_number(text) is None


def test_parse_number_is_exact():
  # A float parse would make 0.1 + 0.2 != 0.3.
  assert parse_number("0.1") + parse_number("0.2") == parse_number("0.3")
  assert parse_number(None) is None


def test_degenerate_text_is_safe_and_cheap():
  # Sampled completions can be anything; none may raise or take seconds (the old fixpoint loop
  # over nested \text{} was quadratic: 90 s here).
  texts = ["\\text{" * 30000 + "5" + "}" * 30000, "1" * 100_000, "#### " + "9" * 10_000,
           "**" * 50_000, "\\boxed{" * 20_000, "answer: x " * 20_000, "1e99999999"]
  start = time.perf_counter()
  for text in texts:
    answer = extract_answer(text)
    assert parse_number(text) is None or text.startswith("\\text")
    answers_equal(answer, "5")
  assert time.perf_counter() - start < 5


# --- answers_equal --------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [
    ("0.5", "1/2"), ("1/2", "\\frac{1}{2}"), ("\\frac{1}{2}", ".50"), ("\\dfrac12", "0.5"),
    ("1,000", "1000"), ("$18", "18"), ("3.0", "3"), ("$1,000.00", "1000"), ("-0", "0"),
    ("\\text{Evelyn}", "evelyn"), ("$(1, 2)$", "(1,2)"), ("\\frac{\\pi}{2}", "\\dfrac{\\pi}{2}"),
    ("Paris.", "paris"),
])
def test_answers_equal(a, b):
  assert answers_equal(a, b)
  assert answers_equal(b, a)


@pytest.mark.parametrize("a, b", [
    ("72", "27"), ("1,5", "15"), ("-3", "3"), ("12.5", "125"), ("0.5", "5"), ("1/2", "2"),
    ("50%", "0.5"), ("\\sqrt{2}", "2"), ("", ""), (None, "3"), ("3", None),
])
def test_answers_differ(a, b):
  assert not answers_equal(a, b)


# --- math_answer ----------------------------------------------------------------------------


def test_math_answer_gsm8k_reference():
  completions = [
      "48/2 = 24 in May, 48 + 24 = 72 in total.\n#### 72",
      "The answer is 72.",
      "She sold \\boxed{72} clips.",
      "#### 27",  # looks right, is not
      "I mention 72 here but box \\boxed{70}.",  # right number in the working, wrong box
      "I have no idea.",  # no answer at all: wrong, not None
  ]
  assert score(completions, [GSM8K_SOLUTION] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_math_answer_wrong_answers_that_look_right():
  cases = [
      ("#### 72", "27"),
      ("First I got 13.\nCorrecting: \\boxed{12}", "13"),
      ("The answer is 1,5", "15"),
      ("\\boxed{-3}", "3"),
      ("The answer is 12.5", "125"),
  ]
  completions, answers = zip(*cases)
  assert score(list(completions), list(answers)) == [0.0] * len(cases)


def test_math_answer_equal_forms():
  cases = [
      ("\\boxed{\\frac{1}{2}}", "0.5"), ("The answer is .50", "1/2"), ("#### 1,000", "1000"),
      ("She pays $18.", "#### 18"), ("\\boxed{3.0}", "3"), ("\\boxed{\\dfrac{\\pi}{2}}",
                                                            "\\frac{\\pi}{2}"),
      ("<think>12*6</think>\n<answer>72</answer>", GSM8K_SOLUTION),
      ("Total: \\boxed{1234}", "She has 1,234 in all.\n#### 1,234"),
  ]
  completions, answers = zip(*cases)
  assert score(list(completions), list(answers)) == [1.0] * len(cases)


def test_math_answer_reference_answers():
  # A one-line reference is taken whole: MATH's "\frac{\pi}{2}" is not its last number, 2.
  assert score(["\\boxed{2}", "\\boxed{\\frac{\\pi}{2}}"], ["\\frac{\\pi}{2}"] * 2) == [0.0, 1.0]
  assert score(["\\boxed{2}", "\\boxed{\\sqrt{2}}"], ["\\sqrt{2}"] * 2) == [0.0, 1.0]
  assert score(["\\boxed{2}", "$\\boxed{(3, \\frac{\\pi}{2})}$"],
               ["(3, \\frac{\\pi}{2})"] * 2) == [0.0, 1.0]
  # Integer cells (a column of ints) work; rows without a reference are None.
  assert score(["#### 5", "#### 5"], [5, 6]) == [1.0, 0.0]
  no_answer = "We discuss the question at length.\nNo conclusion is reached."
  assert score(["#### 5"] * 5, [None, "", "   ", float("nan"), no_answer]) == [None] * 5


def test_math_answer_conversational_matches_plain():
  texts = ["#### 72", "\\boxed{71}", "nothing"]
  messages = [[{"role": "assistant", "content": text}] for text in texts]
  prompts = [[{"role": "user", "content": "How many clips?"}]] * 3
  answers = [GSM8K_SOLUTION] * 3
  plain = math_answer(prompts, texts, answer=answers)
  assert plain == [1.0, 0.0, 0.0]
  assert math_answer(prompts, messages, answer=answers, completion_ids=[[1]] * 3) == plain


def test_math_answer_column_factory():
  solution = math_answer_column("solution")
  assert solution.__name__ == "math_answer_solution"
  assert math_answer_column("answer").__name__ == "math_answer"
  assert math_answer.__name__ == "math_answer"
  rewards = solution(["q"] * 2, ["\\boxed{4}", "\\boxed{5}"],
                     solution=["So $2+2=\\boxed{4}$.", "It is \\boxed{4}."], answer=["5", "5"])
  assert rewards == [1.0, 0.0]
  with pytest.raises(ValueError, match="column"):
    math_answer_column("")


def test_math_answer_input_errors():
  with pytest.raises(ValueError, match="'answer'"):
    math_answer(["q"], ["#### 1"])
  with pytest.raises(ValueError, match="'answer' has 1 values for 2 completions"):
    math_answer(["q"] * 2, ["1", "2"], answer=["1"])
  with pytest.raises(ValueError, match="'answer' must hold one value per completion"):
    math_answer(["q"], ["1"], answer="1")
  with pytest.raises(ValueError, match="'solution'"):
    math_answer_column("solution")(["q"], ["1"], answer=["1"])
  with pytest.raises(ValueError, match="completion"):
    math_answer(["q"], [[{"role": "user", "content": "1"}]], answer=["1"])
