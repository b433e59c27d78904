"""Heuristic quality filters: the Zyda-1 rules (`zyda/utils/filtering.py`) with their thresholds.

A document is dropped when any enabled rule fires, i.e. its feature is below `min` or above `max`.
Each rule is one line of RULES; the pipeline TOML can switch a rule off (`enabled = false`) or move
its bounds, e.g. `[filter.mean_word_length] max = 15`. Features are computed lazily, only for the
enabled rules. As in Zyda-1, most features read the raw text, while the length and the repeated-
character count read the normalized text (normalize.py). "per char" divides by the raw length;
substring counts are case-sensitive, word-list hits are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from ..errors import UserError


@dataclass(frozen=True)
class Rule:
    feature: str
    min: float | None = None
    max: float | None = None
    enabled: bool = True

    def fires(self, value: float) -> bool:
        return (self.min is not None and value < self.min) or (self.max is not None and value > self.max)


RULES = {
    "min_length": Rule("chars", min=100),                           # normalized text shorter than 100 chars
    "mean_word_length": Rule("mean_word_length", min=3, max=12),
    "non_alphanumeric": Rule("non_alnum_fraction", max=0.3),        # share of [^\w\s]
    "numerical": Rule("digit_fraction", max=0.2),
    "repeated_chars": Rule("repeated_char_runs", max=50),           # runs of 7+ identical word characters
    "xml": Rule("count:xml", max=10),
    "xml_declaration": Rule("count:<?xml version=", max=1),
    "lorem_ipsum": Rule("count:lorem ipsum", max=2),
    "urls": Rule("per_char:https://", max=0.002),
    "angle_brackets": Rule("per_char:<", max=0.03),
    "json_keys": Rule('per_char:":', max=0.002),
    "www": Rule("per_char:www.", max=0.01),
    "zh_pornsignals": Rule("words:zh_pornsignals", max=1),
    "sexual_count": Rule("words:sexual", max=10),
    "sexual_per_char": Rule("words_per_char:sexual", max=0.001),
    "profanity": Rule("words_per_char:profanity", max=0.0025),
    "cursed_substrings": Rule("words_per_char:cursed", max=0.01),
}

# word lists matched as whole words (case-insensitive) or as plain substrings
WORDLISTS = {"profanity": "words", "sexual": "words", "zh_pornsignals": "substrings", "cursed": "substrings"}

_WORD_SPLIT = re.compile(r"[\s\-/\\.]+")        # Zyda-1 splits words on whitespace and - / \ .
_NON_ALNUM = re.compile(r"[^\w\s]")
_DIGIT = re.compile(r"\d")
_REPEATED = re.compile(r"(\w)\1{6,}")
_TOKEN = re.compile(r"\w+")


def load_wordlist(path: str | Path | None, name: str) -> list[str]:
    """Entries of a word list file (one per line, # comments); the packaged list when path is None."""
    if path is None:
        text = resources.files("zamba2.pipeline").joinpath("wordlists", f"{name}.txt").read_text("utf-8")
    else:
        try:
            text = Path(path).read_text("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"word list {name!r}: no such file {path}") from None
    entries = [line.strip() if WORDLISTS.get(name) == "words" else line.rstrip("\n")
               for line in text.splitlines() if not line.startswith("#")]
    return [e for e in entries if e.strip()]


def _matcher(entries: list[str], kind: str):
    """A function counting the entries' hits in lowercased text. Lists of single words are counted
    by set membership over the text's words, which is several times faster than a regex alternation."""
    entries = [e.lower() for e in entries]
    if kind == "words" and all(_TOKEN.fullmatch(e) for e in entries):
        vocab = frozenset(entries)
        return lambda words, text: sum(map(vocab.__contains__, words))
    alts = "|".join(re.escape(e) for e in sorted(entries, key=len, reverse=True))  # longest first
    pattern = re.compile(rf"\b(?:{alts})\b" if kind == "words" else f"(?:{alts})")
    return lambda words, text: len(pattern.findall(text))


@dataclass
class FilterConfig:
    rules: dict[str, Rule] = field(default_factory=lambda: dict(RULES))
    wordlists: dict[str, str] = field(default_factory=dict)   # list name -> file replacing the packaged one

    @classmethod
    def from_dict(cls, d: dict) -> "FilterConfig":
        d = dict(d)
        wordlists = d.pop("wordlists", {})
        unknown = set(wordlists) - set(WORDLISTS)
        if unknown:
            raise UserError(f"[filter.wordlists]: unknown list(s) {sorted(unknown)}; known: {sorted(WORDLISTS)}")
        rules = dict(RULES)
        for name, over in d.items():
            if name not in RULES:
                raise UserError(f"[filter]: unknown rule {name!r}; rules: {', '.join(RULES)}")
            if not isinstance(over, dict) or set(over) - {"min", "max", "enabled"}:
                raise UserError(f"[filter.{name}]: only min, max and enabled can be set")
            rules[name] = replace(RULES[name], **over)
        return cls(rules, dict(wordlists))


class Filter:
    """The enabled rules, applied one document at a time."""

    def __init__(self, config: FilterConfig | None = None):
        self.config = config or FilterConfig()
        self.rules = {k: r for k, r in self.config.rules.items() if r.enabled}
        used = {r.feature.split(":", 1)[1] for r in self.rules.values() if r.feature.startswith("words")}
        self.matchers = {name: _matcher(load_wordlist(self.config.wordlists.get(name), name), WORDLISTS[name])
                         for name in used}

    def features(self, raw: str, text: str) -> dict[str, float]:
        """Feature values for the enabled rules. `raw` is the input, `text` the normalized text."""
        out, n = {}, max(len(raw), 1)
        lowered = words = None
        hits: dict[str, int] = {}
        for rule in self.rules.values():
            f = rule.feature
            if f in out:
                continue
            if f == "chars":
                out[f] = len(text)
            elif f == "mean_word_length":
                parts = _WORD_SPLIT.split(raw)
                count = len(parts) - parts.count("")
                out[f] = len("".join(parts)) / count if count else 0.0
            elif f == "non_alnum_fraction":
                out[f] = len(_NON_ALNUM.findall(raw)) / n
            elif f == "digit_fraction":
                out[f] = len(_DIGIT.findall(raw)) / n
            elif f == "repeated_char_runs":
                out[f] = len(_REPEATED.findall(text))
            else:
                kind, arg = f.split(":", 1)
                if kind in ("count", "per_char"):
                    out[f] = raw.count(arg) / (n if kind == "per_char" else 1)
                    continue
                if arg not in hits:  # words, words_per_char: one count per list
                    if lowered is None:
                        lowered = raw.lower()
                        words = _TOKEN.findall(lowered)
                    hits[arg] = self.matchers[arg](words, lowered)
                out[f] = hits[arg] / (n if kind == "words_per_char" else 1)
        return out

    def fired(self, raw: str, text: str) -> list[str]:
        """Names of the rules that drop this document (empty: keep it)."""
        values = self.features(raw, text)
        return [name for name, rule in self.rules.items() if rule.fires(values[rule.feature])]
