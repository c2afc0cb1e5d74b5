"""Real English sentences for calibration and evaluation, of two kinds that the machine itself ships:

- ``python_doc_sentences``: the prose of Python's reference documentation, which every CPython
  installation carries (``pydoc_data.topics``);
- ``debian_package_sentences``: the package descriptions in the Debian package database
  (``/var/lib/dpkg/status``), short English prose about software that is not documentation.

Calibrating on one and evaluating on the other measures how well a conversion holds off its
calibration data (``bench/bench_quality.py``)."""
from __future__ import annotations

import re

DPKG_STATUS = "/var/lib/dpkg/status"


def python_doc_sentences(count: int, offset: int = 0) -> list[str]:
    """``count`` prose sentences from the Python reference documentation, starting at ``offset``."""
    from pydoc_data.topics import topics

    text = " ".join(" ".join(page.split()) for _, page in sorted(topics.items()))
    return _take(_prose(text), count, offset, "the Python documentation (pydoc_data.topics)")


def debian_package_sentences(count: int, offset: int = 0, status: str = DPKG_STATUS) -> list[str]:
    """``count`` prose sentences from the long descriptions of the installed Debian packages, in package-name
    order, each sentence once, starting at ``offset``. Installing or removing packages changes the list."""
    try:
        with open(status, encoding="utf-8") as file:
            database = file.read()
    except OSError as error:
        raise ValueError(f"cannot read the Debian package database {status} ({error.strerror}); on a system "
                         "without dpkg use python_doc_sentences, or pass status= the path of a dpkg status "
                         "file") from error
    paragraphs = {}
    for stanza in database.split("\n\n"):
        package = re.search(r"^Package: *(\S+)", stanza, re.M)
        # the long description: the indented lines after the Description line, " ." between paragraphs
        body = re.search(r"^Description:[^\n]*\n((?: [^\n]*\n?)*)", stanza, re.M)
        if package and body:
            paragraphs[package.group(1)] = re.split(r"^ \.$", body.group(1), flags=re.M)
    sentences = [s for name in sorted(paragraphs) for paragraph in paragraphs[name] for s in _prose(paragraph)]
    return _take(list(dict.fromkeys(sentences)), count, offset, f"the Debian package descriptions in {status}")


def _prose(text: str) -> list[str]:
    """The sentences of ``text`` that read as prose: 40-250 characters, at least 90% letters and spaces."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
            if 40 < len(s) < 250 and sum(c.isalpha() or c == " " for c in s) / len(s) > 0.9]


def _take(sentences: list[str], count: int, offset: int, source: str) -> list[str]:
    if offset + count > len(sentences):
        raise ValueError(f"only {len(sentences)} sentences are available from {source}, asked for "
                         f"{offset + count} (offset {offset} + count {count}); ask for fewer")
    return sentences[offset: offset + count]
