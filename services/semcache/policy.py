"""What counts as a semantic hit: similarity above a threshold AND no
disagreement on the words that flip an answer.

Embedding similarity alone matches questions that share a topic and most of
their words but ask different things — the wrong-answer failure reported
against GPTCache-style caches (loadtest/data/GPTCACHE_FIGURES.md): MiniLM
gives "convert 5 kg to pounds" / "convert 5 pounds to kg" a cosine of 0.99.
So a candidate above the threshold must also agree with the query on:

* **numbers** (``5 miles`` vs ``50 miles``, ``2023`` vs ``2024``): the same
  multiset of numbers;
* **negation** (``safe`` vs ``not safe``): the same negation words, counted;
* **opposites** (``enable``/``disable``, ``high``/``low``, …): no word of a
  known opposite pair on one side only;
* **word order** (``USD to EUR`` vs ``EUR to USD``): the same content words
  in another order ask another question;
* **small edits**: two questions that are word for word the same except for
  one or two content words (``create``/``activate`` a virtual environment,
  roast a ``chicken``/``turkey``) differ exactly in what they ask; a
  paraphrase rewords more broadly. Typos (one word, ≥ 80 % alike, length ±1)
  and filler words (please, can you, …) do not count as edits.

``guard=False`` turns the checks off (similarity only). The labelled
paraphrase benchmark (loadtest/bench_semcache.py) measures both; these rules
were written while reading its failures, so the set is not a held-out test.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

_WORD = re.compile(r"[\w][\w.\-']*")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NEGATIONS = frozenset(
    "not no never none nobody nothing neither nor cannot can't won't don't doesn't didn't isn't aren't wasn't weren't "
    "shouldn't wouldn't couldn't mustn't haven't hasn't hadn't without non".split()
)
_OPPOSITES = [
    ("enable", "disable"), ("enabled", "disabled"), ("increase", "decrease"), ("before", "after"), ("buy", "sell"),
    ("import", "export"), ("add", "remove"), ("open", "close"), ("start", "stop"), ("upload", "download"),
    ("encrypt", "decrypt"), ("install", "uninstall"), ("allow", "block"), ("allow", "deny"), ("above", "below"),
    ("more", "less"), ("higher", "lower"), ("first", "last"), ("min", "max"), ("minimum", "maximum"), ("hot", "cold"),
    ("safe", "unsafe"), ("legal", "illegal"), ("lose", "gain"), ("lock", "unlock"), ("show", "hide"), ("push", "pull"),
    ("left", "right"), ("up", "down"), ("north", "south"), ("east", "west"), ("cheap", "expensive"), ("fast", "slow"),
    ("best", "worst"), ("pros", "cons"), ("advantages", "disadvantages"), ("subscribe", "unsubscribe"),
    ("connect", "disconnect"), ("compress", "decompress"), ("ascending", "descending"), ("input", "output"),
    ("morning", "evening"), ("early", "late"), ("inside", "outside"), ("male", "female"), ("raise", "lower"),
    ("positive", "negative"), ("maximize", "minimize"), ("sunrise", "sunset"), ("accept", "reject"), ("join", "leave"),
    ("include", "exclude"), ("freeze", "thaw"), ("win", "lose"), ("borrow", "lend"), ("arrive", "depart"),
]
_OPPOSITE_OF: dict[str, set[str]] = {}
for _a, _b in _OPPOSITES:
    _OPPOSITE_OF.setdefault(_a, set()).add(_b)
    _OPPOSITE_OF.setdefault(_b, set()).add(_a)


@dataclasses.dataclass(frozen=True, slots=True)
class _Facts:
    words: frozenset[str]  # lowercased words, possessive 's stripped
    numbers: tuple[str, ...]  # sorted
    negations: tuple[str, ...]  # sorted


def _facts(text: str) -> _Facts:
    words = _sequence(text)
    return _Facts(
        frozenset(words),
        tuple(sorted(n.replace(",", "") for n in _NUMBER.findall(text))),
        tuple(sorted(w for w in words if w in _NEGATIONS or w.endswith("n't"))),
    )


def compatible(query: str, candidate: str) -> bool:
    """No number, negation, opposite, word-order or small-edit disagreement between two questions."""
    a, b = _facts(query), _facts(candidate)
    if a.numbers != b.numbers or a.negations != b.negations:
        return False
    for w in a.words ^ b.words:
        if _OPPOSITE_OF.get(w, set()) & (a.words | b.words):
            return False
    return not _small_edit(_sequence(query), _sequence(candidate))


_FILLER = frozenset(
    "a an the please can could would will you tell me i my we our is are was do does did how what which who to of in on "
    "at for it this that there be with and or way just some".split()
)


def _sequence(text: str) -> list[str]:
    out = []
    for m in _WORD.finditer(text.lower()):
        w = m.group().strip(".-'")
        out.append(w[:-2] if w.endswith("'s") else w)
    return [w for w in out if w]


def _small_edit(wa: list[str], wb: list[str]) -> bool:
    ca, cb = [w for w in wa if w not in _FILLER], [w for w in wb if w not in _FILLER]
    if sorted(ca) == sorted(cb):
        return ca != cb  # the same content words in another order
    sm = difflib.SequenceMatcher(a=wa, b=wb, autojunk=False)
    da, db = [], []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op != "equal":
            da += [w for w in wa[i1:i2] if w not in _FILLER]
            db += [w for w in wb[j1:j2] if w not in _FILLER]
    if not da and not db:
        return False
    if len(da) == len(db) == 1 and abs(len(da[0]) - len(db[0])) <= 1 and difflib.SequenceMatcher(a=da[0], b=db[0]).ratio() >= 0.8:
        return False  # a typo (Austria/Australia is not one)
    same = sum(block.size for block in sm.get_matching_blocks())
    return len(da) <= 2 and len(db) <= 2 and same >= 0.6 * max(len(wa), len(wb))


@dataclasses.dataclass(frozen=True, slots=True)
class HitPolicy:
    """Decides whether a stored question may answer a new one."""

    threshold: float  # minimum cosine similarity
    guard: bool = True  # also require compatible() (numbers, negation, opposites, order, small edits)

    def accepts(self, query: str, candidate: str, similarity: float, threshold: float | None = None) -> bool:
        if similarity < (threshold or self.threshold):
            return False
        return not self.guard or compatible(query, candidate)
