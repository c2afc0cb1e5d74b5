"""Real English sentences for calibration and evaluation: the prose of Python's own
documentation, which every CPython installation ships (``pydoc_data.topics``)."""
from __future__ import annotations

import re


def python_doc_sentences(count: int, offset: int = 0) -> list[str]:
    """``count`` prose sentences from the Python reference documentation, starting at ``offset``."""
    from pydoc_data.topics import topics

    text = " ".join(" ".join(page.split()) for _, page in sorted(topics.items()))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text)
                 if 40 < len(s) < 250 and sum(c.isalpha() or c == " " for c in s) / len(s) > 0.9]
    if offset + count > len(sentences):
        raise ValueError(f"only {len(sentences)} sentences are available, asked for {offset + count}")
    return sentences[offset: offset + count]
