"""English sentences from the Python standard library's docstrings: a fixed, offline text corpus.

Deterministic for a given Python version: a fixed sorted module list, members visited in sorted order,
first occurrence kept when deduplicating. Code-like text (doctests, indented blocks, symbol-heavy lines)
is filtered out.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
import warnings
from typing import Any

import numpy as np

MODULES = tuple(sorted((
    "abc", "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.queues", "asyncio.streams", "asyncio.tasks", "base64", "bisect", "bz2", "calendar", "cmd",
    "codecs", "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.message", "email.utils",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar",
    "http.server", "imaplib", "importlib.abc", "importlib.metadata", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "logging.handlers", "lzma", "mailbox", "mimetypes",
    "multiprocessing.pool", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue", "random", "re", "reprlib",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest.case", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "wave", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)))

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_CHARS = set("{}[]=<>\\|~^$#@*`")


def _docstrings(module: Any) -> list[str]:
    """The module's docstring, then those of its own classes/functions and their methods, sorted."""
    docs = [_doc(module)]
    for _, obj in sorted(vars(module).items()):
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        docs.append(_doc(obj))
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member):
                    docs.append(_doc(member))
    return docs


def _doc(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else ""


def _paragraphs(doc: str) -> list[str]:
    """Prose paragraphs of a cleaned docstring, with indented (code/list) lines and doctests dropped."""
    out: list[str] = []
    if not doc:
        return []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = block.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
            continue
        out.append(" ".join(line.strip() for line in lines))
    return out


def _is_prose(sentence: str, min_words: int, max_words: int) -> bool:
    words = sentence.split()
    if not min_words <= len(words) <= max_words:
        return False
    if not (sentence[0].isupper() and sentence[-1] in ".!?"):
        return False
    if any(c in _CODE_CHARS for c in sentence) or "__" in sentence or "::" in sentence:
        return False
    if sum(1 for w in words if "(" in w or "." in w[:-1] or "_" in w) > 2:  # call-like, dotted or names
        return False
    letters = sum(c.isalpha() for c in sentence)
    return letters >= 0.75 * len(sentence.replace(" ", ""))


def docstring_sentences(min_words: int = 5, max_words: int = 40) -> list[str]:
    """Deduplicated English sentences from stdlib docstrings, in a deterministic order.

    Extracted in a fresh isolated interpreter: libraries imported here (torch, typing_extensions) patch
    some stdlib functions, which would change the corpus with what the caller happened to import.
    """
    cmd = [sys.executable, "-I", __file__, str(min_words), str(max_words)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def _extract(min_words: int, max_words: int) -> list[str]:
    seen: dict[str, None] = {}
    for name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:  # e.g. a Python build without ssl or lzma: skip, keep the order
            continue
        for doc in _docstrings(module):
            for para in _paragraphs(doc):
                for sentence in _SENTENCE_END.split(para):
                    sentence = sentence.strip()
                    if sentence and _is_prose(sentence, min_words, max_words):
                        seen.setdefault(sentence, None)
    return list(seen)


def split(sentences: list[str], n_calib: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint random calibration and evaluation sets (seeded shuffle of the whole corpus)."""
    if len(sentences) < n_calib + n_eval:
        raise ValueError(f"corpus has {len(sentences)} sentences, need {n_calib} + {n_eval}")
    order = np.random.default_rng(seed).permutation(len(sentences))
    calib = [sentences[i] for i in order[:n_calib]]
    evals = [sentences[i] for i in order[n_calib:n_calib + n_eval]]
    assert not set(calib) & set(evals)
    return calib, evals


def tokenize(sentences: list[str], tokenizer: Any, max_len: int = 64, pad_to_max: bool = False
             ) -> dict[str, np.ndarray]:
    """int64 ``input_ids`` and ``attention_mask`` [N, L]; L = longest (≤ max_len), or max_len if asked."""
    enc = tokenizer(list(sentences), padding="max_length" if pad_to_max else "longest", truncation=True,
                    max_length=max_len, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}


if __name__ == "__main__":
    print(json.dumps(_extract(int(sys.argv[1]), int(sys.argv[2]))))
