"""moefx.data: the two real corpora (Python's documentation, Debian package descriptions)."""
import os

import pytest

from moefx.data import DPKG_STATUS, debian_package_sentences, python_doc_sentences

STATUS = """Package: zlib1g
Status: install ok installed
Description: compression library - runtime
 zlib is a library implementing the deflate compression method found in gzip and PKZIP.
 This package includes the shared library.
 .
 It is used by many programs that read and write compressed data streams
Homepage: https://zlib.net/

Package: bash
Description: GNU Bourne Again SHell
 Bash is an sh-compatible command language interpreter that executes commands.
 .
 This package includes the shared library.
"""


def test_debian_sentences_are_the_long_descriptions_by_package_name_each_sentence_once(tmp_path):
    status = tmp_path / "status"
    status.write_text(STATUS)
    sentences = debian_package_sentences(4, status=str(status))
    assert sentences == [
        "Bash is an sh-compatible command language interpreter that executes commands.",
        "This package includes the shared library.",  # bash's; zlib1g's copy is left out
        "zlib is a library implementing the deflate compression method found in gzip and PKZIP.",
        # a paragraph ends a sentence: the next one does not run into it
        "It is used by many programs that read and write compressed data streams",
    ]
    assert debian_package_sentences(1, offset=2, status=str(status)) == sentences[2:3]
    with pytest.raises(ValueError, match="only 4 sentences are available .* asked for 5"):
        debian_package_sentences(5, status=str(status))
    with pytest.raises(ValueError, match="cannot read the Debian package database .* use python_doc_sentences"):
        debian_package_sentences(1, status=str(tmp_path / "missing"))


@pytest.mark.skipif(not os.path.exists(DPKG_STATUS), reason="no Debian package database on this system")
def test_the_two_corpora_are_disjoint_prose():
    debian = debian_package_sentences(300)
    docs = python_doc_sentences(300)
    assert len(set(debian)) == 300 and not set(debian) & set(docs)
    assert all(40 < len(s) < 250 for s in debian)
