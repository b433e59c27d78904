"""Text transform applied before filtering (Zyda-1, `preprocess_and_filter.py`, stage A).

Long runs of one separator character are boilerplate (ASCII rules, dot leaders, blank-line padding):
a run of 10 or more of `- _ / \\ \\n \\r . , : ? \\xa0` becomes that character once, and so do runs of
40+ spaces and 20+ tabs. Unicode is put in NFC form first so equal text has equal code points.
"""

from __future__ import annotations

import re
import unicodedata

_SEPARATOR_RUN = re.compile(r"([-_/\\\n\r.,:?\xa0])\1{9,}")
_SPACE_RUN = re.compile(r" {40,}")
_TAB_RUN = re.compile(r"\t{20,}")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = _SEPARATOR_RUN.sub(r"\1", text)
    text = _SPACE_RUN.sub(" ", text)
    return _TAB_RUN.sub("\t", text)
