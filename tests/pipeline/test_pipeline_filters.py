"""Each Zyda-1 rule fires on a positive example and not on a negative one at its threshold; rules
are switched and moved from config; the text transform collapses separator runs."""

import pytest

from zamba2.pipeline.filters import RULES, Filter, FilterConfig, load_wordlist
from zamba2.pipeline.normalize import normalize
from helpers.synthetic import Generator

BASE = Generator(0).document((150, 160))


def fires(rule, text, config=None):
    return rule in Filter(config).fired(text, normalize(text))


def test_clean_prose_passes_every_rule():
    assert Filter().fired(BASE, normalize(BASE)) == []


# rule -> (negative, positive): fixed texts just on either side of the threshold
FIXED = {
    "min_length": (BASE[:100], BASE[:99]),
    "mean_word_length": ("abc " * 60, "ab " * 60),                 # mean 3 is allowed, below is not
    "non_alphanumeric": ("abc! " * 40, "ab!! " * 40),              # 0.2 vs 0.4 of the characters
    "numerical": ("abcd 1 " * 40, "abc 12 " * 40),                 # 0.14 vs 0.29
    "repeated_chars": (BASE + " aaaaaaa" * 50, BASE + " aaaaaaa" * 51),
    "xml": (BASE + " xml" * 10, BASE + " xml" * 11),
    "xml_declaration": (BASE + " <?xml version=" * 1, BASE + " <?xml version=" * 2),
    "lorem_ipsum": (BASE + " lorem ipsum" * 2, BASE + " lorem ipsum" * 3),
    "zh_pornsignals": (BASE + " 色情", BASE + " 色情 赌博"),
    "sexual_count": (BASE * 10 + " porn" * 10, BASE * 10 + " porn" * 11),
}
# rule -> snippet whose count per character is the feature: found by adding it until the rule fires
PER_CHAR = {"urls": (" https://x.org", 0.002), "angle_brackets": (" <b", 0.03), "json_keys": (' "k": 1', 0.002),
            "www": (" www.x", 0.01), "sexual_per_char": (" porn", 0.001), "profanity": (" damn", 0.0025),
            "cursed_substrings": (" caf\u00c3\u00a9", 0.01)}


def test_every_rule_has_examples():
    assert set(FIXED) | set(PER_CHAR) | {"mean_word_length_max"} >= set(RULES)


@pytest.mark.parametrize("rule", sorted(FIXED))
def test_fixed_examples(rule):
    negative, positive = FIXED[rule]
    assert not fires(rule, negative) and fires(rule, positive)


def test_mean_word_length_upper_bound():
    assert not fires("mean_word_length", "abcdefghijkl " * 20) and fires("mean_word_length", "abcdefghijklm " * 20)


@pytest.mark.parametrize("rule", sorted(PER_CHAR))
def test_per_char_examples(rule):
    snippet, threshold = PER_CHAR[rule]
    assert RULES[rule].max == threshold
    text = BASE
    while not fires(rule, text):
        negative, text = text, text + snippet
    k = text.count(snippet)
    assert k / len(text) > threshold >= (k - 1) / len(negative)   # the boundary is the documented one
    assert not fires(rule, negative)


def test_rules_switch_off_and_move():
    text = "abcdefghijklmn " * 20  # mean word length 14
    assert fires("mean_word_length", text)
    assert not fires("mean_word_length", text, FilterConfig.from_dict({"mean_word_length": {"max": 15}}))
    assert not fires("mean_word_length", text, FilterConfig.from_dict({"mean_word_length": {"enabled": False}}))
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        FilterConfig.from_dict({"nope": {"max": 1}})
    with pytest.raises(ValueError, match="only min, max and enabled"):
        FilterConfig.from_dict({"xml": {"threshold": 1}})


def test_word_lists_are_package_data_and_replaceable(tmp_path):
    for name in ("profanity", "sexual", "zh_pornsignals", "cursed"):
        assert len(load_wordlist(None, name)) >= 10
    (tmp_path / "mine.txt").write_text("# my list\nzorblat\n")
    cfg = FilterConfig.from_dict({"wordlists": {"profanity": str(tmp_path / "mine.txt")}})
    assert fires("profanity", "zorblat " * 5 + BASE[:200], cfg) and not fires("profanity", " damn" * 5 + BASE, cfg)
    with pytest.raises(ValueError, match="unknown list"):
        FilterConfig.from_dict({"wordlists": {"slurs": "x.txt"}})


def test_normalize_collapses_separator_runs():
    assert normalize("a" + "-" * 10 + "b" + "." * 9 + "c") == "a-b" + "." * 9 + "c"
    assert normalize("x" + " " * 40 + "y" + " " * 39 + "z") == "x y" + " " * 39 + "z"
    assert normalize("\t" * 20 + "\n" * 12 + "e\u0301") == "\t\n\u00e9"   # NFC joins e + combining accent
