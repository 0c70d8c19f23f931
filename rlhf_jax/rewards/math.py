"""Math answers: extraction from solutions and completions, exact parsing of numbers, equivalence,
and the `math_answer` reward (GSM8K, MATH and datasets like them).

Pure Python: numbers become `fractions.Fraction`, so "0.1 + 0.2"-style float error cannot make a
right answer wrong, and `0.5`, `1/2`, `\\frac{1}{2}` and `.50` are one value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from rlhf_jax.rewards.text import (_column, _reference_text, completion_text,
                                   extract_tagged_answer)

__all__ = [
    "extract_answer",
    "parse_number",
    "answers_equal",
    "math_answer",
    "math_answer_column",
]

# An unsigned number: digits with optional well-formed thousands groups ("1,234", not "1,5") and
# decimals, or a bare ".5".
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_LATEX_FRAC = r"\\[dt]?frac\s*\{[^{}]*\}\s*\{[^{}]*\}"
# Candidates for the last-number rule. The look-behind keeps "x-3" from reading as -3 and stops a
# match from starting inside another number; a fraction "3/4" is one number.
_ANY_NUMBER = re.compile(rf"(?<![\w.])-?(?:{_LATEX_FRAC}|(?:{_NUM})(?:/\d+(?![\d.]))?)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "the answer is X", "Answer: X", "**Final answer:** X", "answer = X"; X runs to the end of its
# sentence (a period, comma or semicolon before a space or the end) or line.
_PHRASE = re.compile(r"\banswer\b[\s*_]*(?:is\b[\s*_:]*|[:=][\s*_]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.,;](?=\s|$)")

_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{")
_SPACING = re.compile(r"\\(?:quad|qquad)(?![a-zA-Z])|\\[,;:! >]|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\u00b0")
_ASSIGNMENT = re.compile(r"[A-Za-z]\s*=\s*")
_CURRENCY = re.compile(r"(?:[$\u20ac\u00a3\u00a5]|usd(?![a-z]))\s*", re.IGNORECASE)
# What may follow a number: a percent sign, a currency sign, or unit words after a space.
_SUFFIX = re.compile(r"(?<=[\d}])(?:\s*[%$\u20ac\u00a3\u00a5]|\s+[A-Za-z][A-Za-z\s./]*)$")
_FRACTION = re.compile(r"\\frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)")
_SLASH = re.compile(rf"({_NUM})\s*/\s*([+-]?)({_NUM})")
_PLAIN = re.compile(rf"({_NUM})(?:[eE]([+-]?\d+))?")
_MAX_LAYERS = 8  # of surrounding delimiters `_clean` strips
_MAX_CHARS = 1000  # longer is no answer (and int() refuses over 4300 digits)
_MAX_EXPONENT = 1000  # "1e999999999" would otherwise build a 10**999999999 Fraction


def extract_answer(text: Any) -> str | None:
  """The final answer of a solution or completion (a string, or a completion in message form),
  or None when there is none. Rules, first that applies:

  0. `<answer>...</answer>`: when present, only the content of the last one is searched (rules
     1-3), and if none applies a one-line content is the answer as a whole.
  1. GSM8K's `#### <answer>`: the text after the last `####`, when it is on the last non-empty
     line (so markdown headings such as `#### Step 1` followed by more text are not answers).
  2. The content of the last `\\boxed{...}` or `\\fbox{...}`, braces balanced (nested `\\frac{1}{2}`
     works); an empty or unclosed last box is skipped.
  3. The last phrase "answer is X" / "answer: X" / "answer = X" (any case, markdown bold
     allowed), X cut at the end of its sentence or line.
  4. The whole text, when it is a number (`parse_number`).
  5. The last number in the text ("3", "-2.5", "1,234", "3/4", "\\frac{1}{2}").
  """
  text = text if isinstance(text, str) else completion_text(text)
  tagged = extract_tagged_answer(text)
  if tagged is not None:
    return _region_answer(tagged)
  return _marked_answer(text) or _number_answer(text)


def _region_answer(text: str) -> str | None:
  """Rules 1-3; else the whole text when it is one line; else rules 4-5."""
  marked = _marked_answer(text)
  if marked is not None:
    return marked
  stripped = text.strip()
  if stripped and "\n" not in stripped:
    return stripped
  return _number_answer(text)


def _marked_answer(text: str) -> str | None:
  hashes = text.rfind("####")
  if hashes >= 0:
    rest = text[hashes + 4:].strip()
    if rest and "\n" not in rest:
      return rest
  boxes = list(_BOXED.finditer(text))
  if boxes:
    content = _balanced(text, boxes[-1].end())
    if content:
      return content
  for match in reversed(list(_PHRASE.finditer(text))):
    line_end = text.find("\n", match.end())
    line = text[match.end():None if line_end < 0 else line_end]
    value = _SENTENCE_END.split(line, maxsplit=1)[0].strip()
    if value:
      return value
  return None


def _balanced(text: str, start: int) -> str | None:
  """The stripped text from `start` to the brace closing the one just before it (escaped `\\{`,
  `\\}` do not count), or None when it never closes."""
  depth, i = 1, start
  while i < len(text):
    char = text[i]
    if char == "\\":
      i += 2
      continue
    depth += (char == "{") - (char == "}")
    if depth == 0:
      return text[start:i].strip()
    i += 1
  return None


def _number_answer(text: str) -> str | None:
  if parse_number(text) is not None:
    return text.strip()
  matches = list(_ANY_NUMBER.finditer(text))
  return matches[-1].group() if matches else None


def _clean(text: str) -> str:
  """LaTeX and markdown noise removed: `\\text{}`-style wrappers, spacing commands, `\\left`,
  `\\right`, `\\dfrac`, degrees, then (a few times over) surrounding whitespace, trailing periods
  and surrounding `$`, `\\(...\\)`, `\\[...\\]` and `**` pairs."""
  s = _unwrap(text.replace("\\$", "$").replace("\\%", "%").replace("{,}", ","))
  s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
  s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
  s = re.sub(r"(?<=\d)\\[,!](?=\d)", "", s)  # 1\,000 and 1\!000: a thin space as separator
  s = _DEGREES.sub("", _SPACING.sub(" ", s))
  for _ in range(_MAX_LAYERS):  # bounded: "**" * 50_000 must not cost 25_000 passes
    previous = s
    s = s.strip().rstrip(".").rstrip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
      inner = s[len(left):len(s) - len(right)]
      if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right) \
          and "$" not in inner:
        s = inner
        break
    if s == previous:
      break
  return s


def _unwrap(s: str) -> str:
  """`s` with `\\text{...}`-style wrappers replaced by their content, nested ones included, in one
  linear pass (a regex applied until nothing changes is quadratic in the nesting depth)."""
  if not _WRAPPER.search(s):
    return s
  out, drop_closer, i = [], [], 0
  while i < len(s):
    char = s[i]
    if char == "\\":
      wrapper = _WRAPPER.match(s, i)
      if wrapper:
        drop_closer.append(True)
        i = wrapper.end()
      else:
        out.append(s[i:i + 2])
        i += 2
      continue
    if char == "{":
      drop_closer.append(False)
    elif char == "}" and drop_closer and drop_closer.pop():
      i += 1
      continue
    out.append(char)
    i += 1
  return "".join(out)


def parse_number(text: Any) -> Fraction | None:
  """`text` as an exact `Fraction`, or None when it is not (only) a number.

  Accepts: integers and decimals with an optional sign (`-3`, `3.50`, `.5`, `1e-3`); thousands
  separators in groups of three (`1,000`, `12,345.6`, `1{,}000`, `1\\,000`; `1,5` is None, not
  15); fractions `3/4`, `\\frac{3}{4}`, `\\dfrac`, `\\tfrac`, `\\frac12`, `-\\frac{1}{2}`; a leading
  currency sign (`$`, `€`, `£`, `¥`, `USD`) and a trailing `%`, currency sign or unit words after
  a space (`72 dollars`, `5 km/h`), which are dropped: `50%` is 50, not 1/2, as GSM8K writes
  percentages as bare numbers; a leading `x =`; LaTeX wrappers (`$...$`, `\\(...\\)`, `\\text{}`,
  `\\!`, `\\,`, `^\\circ`) and a trailing period. Mixed numbers ("1 1/2") are not numbers here.
  """
  if not isinstance(text, str):
    return None
  s = _clean(text)
  if len(s) > _MAX_CHARS:
    return None
  assignment = _ASSIGNMENT.match(s)
  s = s[assignment.end():] if assignment else s
  negative, s = _split_sign(s)
  currency = _CURRENCY.match(s)
  if currency:
    s = s[currency.end():]
    if not negative:  # "$-5" as well as "-$5"
      negative, s = _split_sign(s)
  value = _unsigned(_SUFFIX.sub("", s))
  return None if value is None else (-value if negative else value)


def _split_sign(s: str) -> tuple[bool, str]:
  if s[:1] in ("-", "+", "\u2212"):
    return s[0] != "+", s[1:].lstrip()
  return False, s


def _unsigned(s: str) -> Fraction | None:
  fraction = _FRACTION.fullmatch(s)
  if fraction:
    top, bottom = (parse_number(part.strip("{}")) for part in fraction.groups())
    return None if top is None or not bottom else top / bottom
  slash = _SLASH.fullmatch(s)
  if slash:
    top, bottom = _exact(slash.group(1)), _exact(slash.group(3))
    if bottom == 0:
      return None
    return top / bottom * (-1 if slash.group(2) == "-" else 1)
  plain = _PLAIN.fullmatch(s)
  if plain:
    exponent = int(plain.group(2) or 0)
    if abs(exponent) > _MAX_EXPONENT:
      return None
    return _exact(plain.group(1)) * Fraction(10) ** exponent
  return None


def _exact(number: str) -> Fraction:
  return Fraction(number.replace(",", ""))


def _normalize_answer(text: str) -> str:
  return re.sub(r"\s+", "", _clean(text).casefold()).rstrip(".")


def answers_equal(predicted: str | None, reference: str | None) -> bool:
  """Whether two extracted answers agree: as numbers (`parse_number`, exact) when both parse;
  otherwise as strings after normalisation (LaTeX wrappers, surrounding `$` and a trailing
  period dropped, case-folded, all whitespace removed). None or empty never equals anything.
  """
  if predicted is None or reference is None:
    return False
  predicted_value, reference_value = parse_number(predicted), parse_number(reference)
  if predicted_value is not None and reference_value is not None:
    return predicted_value == reference_value
  normalized = _normalize_answer(predicted)
  return bool(normalized) and normalized == _normalize_answer(reference)


def _reference_answer(text: str) -> str | None:
  """A reference's answer: as `extract_answer`, except that a one-line reference with no
  `####`, box or answer phrase is taken whole (MATH's `\\frac{\\pi}{2}` is not "2")."""
  tagged = extract_tagged_answer(text)
  return _region_answer(text if tagged is None else tagged)


def _score(completions: Sequence, values: Any, column: str, name: str) -> list[float | None]:
  references = _column(column, values, completions, name)
  rewards: list[float | None] = []
  for completion, value in zip(completions, references):
    reference_text = _reference_text(value)
    reference = None if reference_text is None else _reference_answer(reference_text)
    if reference is None:
      rewards.append(None)
      continue
    predicted = extract_answer(completion_text(completion))
    rewards.append(float(answers_equal(predicted, reference)))
  return rewards


def math_answer(prompts: Sequence, completions: Sequence, answer: Sequence | None = None,
                **kwargs) -> list[float | None]:
  """1.0 where the completion's final answer equals the reference in the `answer` column, 0.0
  where it differs or the completion has no answer, None where the row has no reference (None,
  NaN, blank) or the reference has no answer.

  Both sides go through answer extraction (`extract_answer`; a one-line reference is taken
  whole), so GSM8K's worked solution ending in `#### 72`, MATH's boxed solution and a bare "72"
  all work as references; the answers are compared with `answers_equal`. A completion's answer
  inside `<answer>...</answer>` is found first. Raises ValueError when the `answer` column is
  missing.
  """
  return _score(completions, answer, "answer", "math_answer")


def math_answer_column(column: str) -> Callable[..., list]:
  """`math_answer` reading its reference from `column` (e.g. "solution" for MATH); the returned
  function is named `math_answer_<column>` ("math_answer" for "answer")."""
  if not isinstance(column, str) or not column.isidentifier():
    raise ValueError(f"column: expected a dataset column name, got {column!r}")
  name = "math_answer" if column == "answer" else f"math_answer_{column}"

  def reward(prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
    return _score(completions, columns.get(column), column, name)

  reward.__name__ = reward.__qualname__ = name
  reward.__doc__ = f"math_answer with the reference read from the {column!r} column."
  return reward
