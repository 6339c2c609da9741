"""Calibration text for MiniLM from English prose that ships with the installed packages (offline).

Data-aware compression (Wanda, SparseGPT, quantization ranges) estimates each layer's input
statistics from calibration tokens. A layer with K inputs needs well over K tokens for its
Hessian E[x x^T] to have full rank (MiniLM's FFN-down has K = 1536), so a few dozen sentences
are not enough. This module gathers a few hundred passages of real English:

- `pydoc_data.topics` (the Python reference manual's prose, ~450 KB, part of the stdlib),
- the dataset descriptions `sklearn/datasets/descr/*.rst` (when scikit-learn is installed),
- the docstrings of the stdlib's top-level modules (read with `ast`, nothing is imported),
- `evaluate.CALIBRATION_SENTENCES` (everyday sentences, written for this project),
- `everyday.txt`: ~1200 everyday English texts (single sentences, short questions, two- and
  three-sentence snippets across many domains), written for this project by a helper that never
  saw the evaluation sentences; the 7 lines it wrote within a difflib ratio of 0.7 of an
  evaluation or ranking sentence were removed (`tests/models/test_minilm.py` keeps it so).
  Every eighth line is held out of calibration (`held_out_everyday`): a second, larger
  evaluation set that shows whether a gain from calibrating on everyday text carries over to
  sentences no pass has seen.
- `everyday_extra.txt`: ~1500 more everyday texts of the same kinds, written later by another
  helper under the same rule (it saw neither the evaluation sentences nor `everyday.txt`); 20
  of its 1500 lines were dropped: 3 within a difflib ratio of 0.7 of an evaluation or ranking
  sentence, 4 repeats and 13 close paraphrases (ratio >= 0.85) of `everyday.txt` lines. It
  only extends calibration: nothing of it is held out.
- `everyday_more.txt`: ~5400 more, written later by three helpers (household and leisure; work,
  school, science and news; culture, questions, messages and reviews) under the same rule; 57
  of their 5420 lines were dropped: 6 within 0.7 of an evaluation sentence, 17 repeats and 34
  close paraphrases (>= 0.85) of earlier lines. Calibration only, after `everyday_extra.txt`:
  the held-out lines of the 2:4 MiniLM gain from every text added (bench/results/sparsify.md).
- `everyday_topics.txt`: ~9900 more, written later by four helpers, each given its own list of
  topics (health, food, shopping and travel; weather, nature, science, city life and history;
  reviews, orders, devices, software and media; school, sports, money, jobs, paperwork and
  holidays) and interleaved line by line, under the same rule; 93 of their 10010 lines were
  dropped: 1 within 0.7 of an evaluation sentence, 25 repeats and 67 close paraphrases
  (>= 0.85) of earlier lines. Calibration only, after `everyday_more.txt`.

Paragraphs are kept when they read as prose (no indented code, mostly letters) and split into
sentences. `calibration_texts` returns single sentences (words=0; measured best for SparseGPT on
MiniLM, whose evaluation sentences are short: the [CLS]/[SEP] tokens then weigh in the statistics
as they do at evaluation) or, with words > 0, the sentences of one document packed in order into
passages of about `words` words, which fill a 128-token sequence with little padding.
`everyday_texts` returns the everyday calibration texts alone (corpus="everyday" of
`evaluate.calibration_npz`): a sentence-embedding model is used on short everyday text, and its
layer statistics on documentation prose differ from those. Everything is
deterministic (sorted sources, no randomness). None of it overlaps the evaluation sentences
(`evaluate.EVAL_SENTENCES` / `RANKING_TRIPLES`), which `calibration_passages` checks.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

__all__ = ["prose_documents", "calibration_texts", "everyday_texts", "held_out_everyday"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
# Lines that are code, reST markup or headings rather than prose; list markers are stripped.
_MARKUP = re.compile(r"^(\s|[*=\-~^#+|.:]{3,}|\.\. |>>>)")
_LIST_MARKER = re.compile(r"^([-*]|\d+\.)\s+")
_EVERYDAY_FILE = Path(__file__).with_name("everyday.txt")
_EXTRA_FILE = Path(__file__).with_name("everyday_extra.txt")
_MORE_FILE = Path(__file__).with_name("everyday_more.txt")
_TOPICS_FILE = Path(__file__).with_name("everyday_topics.txt")
_HELD_OUT_EVERY = 8  # every eighth line of everyday.txt is never used for calibration


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text: no indented/code lines, mostly letters, at least 12 words."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(_MARKUP.match(line) for line in lines):
            continue
        paragraph = " ".join(_LIST_MARKER.sub("", line.strip()) for line in lines)
        letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
        if len(paragraph.split()) >= 12 and letters >= 0.85 * len(paragraph) \
                and "::" not in paragraph:
            paragraphs.append(paragraph)
    return paragraphs


@lru_cache(maxsize=None)
def prose_documents() -> tuple[tuple[str, ...], ...]:
    """Each source document as a tuple of its prose sentences, in a fixed order."""
    documents = []
    from pydoc_data.topics import topics
    for key in sorted(topics):
        documents.append(topics[key])
    try:
        import sklearn.datasets
        descr = Path(sklearn.datasets.__file__).parent / "descr"
        for path in sorted(descr.glob("*.rst")):
            documents.append(path.read_text(encoding="utf-8", errors="replace"))
    except ImportError:  # scikit-learn is optional: the stdlib text alone is ~1500 sentences
        pass
    documents.extend(_stdlib_docstrings())
    result = []
    for text in documents:
        sentences = [s.strip() for p in _prose_paragraphs(text) for s in _SENTENCE_END.split(p)]
        sentences = [s for s in sentences if len(s.split()) >= 4]
        if sentences:
            result.append(tuple(sentences))
    return tuple(result)


def _stdlib_docstrings() -> list[str]:
    """Per top-level stdlib module (sorted by name): its module, class and function docstrings."""
    import ast
    import sysconfig

    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-z]*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        docs = [ast.get_docstring(n) for n in nodes]
        texts.append("\n\n".join(d for d in docs if d))
    return texts


def _pack(sentences, words: int) -> list[str]:
    """Consecutive sentences joined into passages of at least `words` words (the last may be
    shorter)."""
    passages, current, count = [], [], 0
    for sentence in sentences:
        current.append(sentence)
        count += len(sentence.split())
        if count >= words:
            passages.append(" ".join(current))
            current, count = [], 0
    if current:
        passages.append(" ".join(current))
    return passages


def calibration_texts(n: int, words: int = 0) -> list[str]:
    """`n` calibration texts: the project's CALIBRATION_SENTENCES interleaved (one in eight) with
    prose sentences (words=0) or passages of about `words` words (~`words` x 1.3 tokens); raises
    ValueError when the corpus has fewer than `n` texts (~5800 sentences, ~950 passages of 110).

    Texts are taken round-robin over the documents (first text of every document, then the
    second, ...) so that a small `n` still spans many topics.
    """
    from .evaluate import CALIBRATION_SENTENCES, EVAL_SENTENCES, RANKING_TRIPLES

    per_document = [list(sentences) if words <= 0 else _pack(sentences, words)
                    for sentences in prose_documents()]
    # The manuals repeat a few sentences verbatim (5 of the first 512 texts); kept, harmless.
    prose = [doc[i] for i in range(max(map(len, per_document))) for doc in per_document
             if i < len(doc)]
    everyday = list(CALIBRATION_SENTENCES)
    texts = []
    while len(texts) < n and (prose or everyday):
        if everyday and (len(texts) % 8 == 0 or not prose):
            texts.append(everyday.pop(0))
        else:
            texts.append(prose.pop(0))
    if len(texts) < n:
        raise ValueError(f"the calibration corpus has {len(texts)} texts, {n} requested")
    held_out = set(EVAL_SENTENCES) | {s for triple in RANKING_TRIPLES for s in triple}
    leaked = [s for s in held_out if any(s in text for text in texts)]
    if leaked:  # cannot happen with the shipped sources; guards future edits of the lists
        raise AssertionError(f"calibration text contains evaluation sentences: {leaked[:2]}")
    return texts


def _read_lines(path: Path) -> tuple[str, ...]:
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip())


@lru_cache(maxsize=None)
def _everyday_lines() -> tuple[str, ...]:
    return _read_lines(_EVERYDAY_FILE)


@lru_cache(maxsize=None)
def _extra_lines() -> tuple[str, ...]:
    """The calibration-only lines, in the order they were written: everyday_extra.txt,
    everyday_more.txt, then everyday_topics.txt."""
    return _read_lines(_EXTRA_FILE) + _read_lines(_MORE_FILE) + _read_lines(_TOPICS_FILE)


def held_out_everyday() -> list[str]:
    """The lines of everyday.txt kept out of calibration (every eighth, ~150): for evaluation."""
    return [line for i, line in enumerate(_everyday_lines())
            if i % _HELD_OUT_EVERY == _HELD_OUT_EVERY - 1]


def everyday_texts(n: int) -> list[str]:
    """`n` everyday calibration texts. Up to ~1100: from CALIBRATION_SENTENCES and the
    calibration lines of everyday.txt, taken at even spacing when `n` is smaller so that every
    domain of the file is represented; above that, all of those and then the first lines of
    everyday_extra.txt, everyday_more.txt and everyday_topics.txt (~2580 with the first, ~7940
    with two, ~17860 with all three; the files came later, and this keeps the texts of every
    smaller `n` as they were). Raises ValueError when more are requested than exist."""
    from .evaluate import CALIBRATION_SENTENCES

    held_out = set(held_out_everyday())
    pool = list(CALIBRATION_SENTENCES) + [line for line in _everyday_lines()
                                          if line not in held_out]
    extra = _extra_lines()
    if not 1 <= n <= len(pool) + len(extra):
        raise ValueError(f"the everyday corpus has {len(pool) + len(extra)} texts, "
                         f"{n} requested")
    if n > len(pool):
        return pool + list(extra[:n - len(pool)])
    return [pool[i * len(pool) // n] for i in range(n)]
