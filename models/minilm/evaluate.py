"""Quality checks for (compressed) all-MiniLM-L6-v2 ONNX models, run with onnxruntime on CPU.

- `cosine_to_reference`: cosine similarity between a candidate's sentence embeddings and the
  uncompressed model's, on EVAL_SENTENCES (1.0 = unchanged). Mean and worst sentence.
- `ranking_accuracy`: on RANKING_TRIPLES (anchor, positive, negative), the fraction where the
  anchor is closer to the positive. The negatives share words or topic with the anchor, so a
  model that degrades to bag-of-words similarity loses points. The original model scores 1.0.
- `calibration_npz`: the project's `--calib` file from CALIBRATION_SENTENCES, a list disjoint
  from the evaluation sentences so that data-aware passes are not tuned on the test set, or
  (n > 48, corpus="prose" or "passages") from the larger prose corpus of `models.minilm.corpus`,
  or (corpus="everyday") from its everyday sentences.

Every evaluation and ranking sentence fits in 32 tokens with [CLS]/[SEP], so models built with
seq_len >= 32 see them untruncated and score the same across seq_len. Every sixth calibration
sentence is a passage of about 50 tokens so that calibration also covers later positions.

CLI: `python -m models.minilm.evaluate MODEL.onnx [--reference REF.onnx]` prints
`cosine_mean=... cosine_min=... ranking=...`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

from .build import model_path
from .tokenizer import tokenize

__all__ = ["EVAL_SENTENCES", "RANKING_TRIPLES", "CALIBRATION_SENTENCES", "embed",
           "cosine_to_reference", "ranking_accuracy", "calibration_npz"]

EVAL_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The central bank kept interest rates unchanged this quarter.",
    "She scored the winning goal in the final minute of the match.",
    "Add the flour slowly and stir until the batter is smooth.",
    "The new smartphone has a faster processor and a better camera.",
    "Mount Everest is the highest mountain above sea level.",
    "He apologized for arriving late to the meeting.",
    "Vaccines train the immune system to recognize a virus.",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "Our flight to Tokyo was delayed by three hours.",
    "Rust guarantees memory safety without a garbage collector.",
    "The museum reopened after a year of renovations.",
    "Global temperatures have risen steadily over the past century.",
    "My cat sleeps on the windowsill every afternoon.",
    "The court ruled that the contract was invalid.",
    "Electric cars are becoming cheaper to produce.",
    "Can you recommend a good book about ancient Rome?",
    "The bakery on the corner sells fresh bread every morning.",
    "Astronomers detected water vapor in the atmosphere of a distant planet.",
    "The company reported record profits despite the recession.",
    "Regular exercise improves both mood and sleep quality.",
    "The train leaves the station at half past seven.",
    "Students must submit their essays before Friday.",
]

# (anchor, positive, negative): the negative reuses a word or the setting of the anchor.
RANKING_TRIPLES = [
    ("How do I reset my email password?",
     "I forgot the login credentials for my mail account.",
     "My email inbox is full of newsletters."),
    ("The stock market fell sharply today.",
     "Share prices dropped steeply on Wall Street this afternoon.",
     "The farmers' market sells fresh vegetables today."),
    ("A dog is running across the park.",
     "A puppy sprints across the grass.",
     "A hot dog stand sits near the park entrance."),
    ("The patient was prescribed antibiotics for the infection.",
     "The doctor gave her medicine to treat the bacterial illness.",
     "The patient waited for the bus in the rain."),
    ("Python is a popular programming language.",
     "Many developers write their software in Python.",
     "The python is a large snake found in Asia."),
    ("The bank raised interest rates again.",
     "The central bank increased borrowing costs.",
     "We sat on the river bank and had a picnic."),
    ("She plays the violin in an orchestra.",
     "She is a string musician in a symphony.",
     "She plays tennis every weekend."),
    ("Heavy rain caused flooding in the city.",
     "Storms left the streets downtown underwater.",
     "The city opened a new public library."),
]

CALIBRATION_SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "The committee will publish its findings next month.",
    "Please turn off the lights when you leave the room.",
    "The recipe calls for two eggs, a cup of sugar and some butter.",
    "Scientists are studying how coral reefs respond to warmer oceans.",
    "Although the forecast promised sunshine for the whole weekend, a cold front moved in on "
    "Saturday morning. The outdoor concert had to be postponed, and the organizers promised "
    "that every ticket would remain valid for the new date, which will be announced next week.",
    "What time does the pharmacy close on Sundays?",
    "The software update fixed several security vulnerabilities.",
    "Children were playing football in the schoolyard.",
    "The river flooded the village after days of heavy rain.",
    "He has been learning Japanese for three years.",
    "The new regulation requires manufacturers to label every product with its country of "
    "origin, its recycling category and a contact address for complaints. Companies that fail "
    "to comply within six months may face fines of up to four percent of their annual turnover.",
    "The hotel offers free breakfast and airport shuttle service.",
    "Inflation reduces the purchasing power of savings.",
    "The detective found a hidden letter in the old desk.",
    "Wind turbines generate electricity without burning fuel.",
    "I would like to book a table for four at eight o'clock.",
    "After graduating from university, she spent two years volunteering at a rural clinic, "
    "where she treated patients who had to walk for hours to reach a doctor. She then returned "
    "to the capital to specialize in pediatric medicine and now runs a children's hospital.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Our team meeting has been moved to Thursday afternoon.",
    "The painting was sold at auction for a record price.",
    "Most birds migrate south before the winter begins.",
    "The government announced new funding for public hospitals.",
    "The quarterly report shows that revenue grew by twelve percent, mainly thanks to strong "
    "demand in Asia, while operating costs stayed roughly flat compared with last year. The "
    "board therefore raised its forecast for the full year and proposed a higher dividend.",
    "She carefully folded the map and put it in her backpack.",
    "Machine translation has improved a lot in recent years.",
    "The referee showed the defender a red card.",
    "Drink plenty of water when you hike in hot weather.",
    "The library lends laptops to students for free.",
    "To install the package, download the archive, extract it into a folder of your choice, "
    "open a terminal in that folder and run the setup script with administrator rights. If the "
    "script reports missing dependencies, install them with your system's package manager first.",
    "A strong earthquake shook the coastal region overnight.",
    "The startup raised ten million dollars in its first funding round.",
    "My grandmother grows tomatoes and peppers in her garden.",
    "The password must contain at least one number and one symbol.",
    "The chef prepared a five-course dinner with local ingredients.",
    "Researchers trained the model on millions of labeled images and then evaluated it on a "
    "held-out test set to measure how well it generalizes to pictures it has never seen. "
    "Accuracy dropped noticeably on photos taken at night or in heavy fog.",
    "Traffic on the highway was slow because of an accident.",
    "The novel tells the story of a family over three generations.",
    "Tea is grown on steep hillsides.",
    "The bridge is closed for repairs.",
    "Lions hunt mostly at night.",
    "The ancient city was abandoned in the twelfth century, probably because a long drought "
    "destroyed the harvests for several years in a row. Its ruins, hidden under dense jungle, "
    "were only rediscovered by archaeologists in 1911 and are now a popular tourist site.",
    "He missed the last bus home.",
    "Prices at the pump rose again.",
    "The baby finally fell asleep.",
    "Which platform does the train leave from?",
    "The vote was postponed.",
    "If you have any questions about your order, our customer service team is available by "
    "phone or chat every day from nine in the morning until six in the evening. Returns are "
    "free within thirty days, provided the item is unused and in its original packaging.",
]


class _Runner:
    """An onnxruntime session plus the static [batch, seq_len] its inputs declare."""

    def __init__(self, model):
        import onnxruntime as ort  # deferred: importing the package should stay cheap

        if isinstance(model, onnx.ModelProto):
            model = model.SerializeToString()
        source = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)
        self.session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs:
            raise ValueError(f"model has no 'input_ids' input (inputs: {', '.join(inputs)})")
        self.input_names = list(inputs)
        shape = inputs["input_ids"].shape
        if len(shape) != 2 or not all(isinstance(d, int) for d in shape):
            raise ValueError(f"expected static input_ids shape [batch, seq_len], got {shape}")
        self.batch, self.seq_len = shape
        if "sentence_embedding" not in {o.name for o in self.session.get_outputs()}:
            raise ValueError("model has no 'sentence_embedding' output")

    def embed(self, sentences: list[str]) -> np.ndarray:
        feeds = tokenize(sentences, self.seq_len)
        n = len(sentences)
        # Static batch: pad the last chunk by repeating its final row, drop those rows after.
        padded = -n % self.batch
        feeds = {k: np.pad(v, ((0, padded), (0, 0)), mode="edge") for k, v in feeds.items()
                 if k in self.input_names}
        chunks = [self.session.run(["sentence_embedding"],
                                   {k: v[i:i + self.batch] for k, v in feeds.items()})[0]
                  for i in range(0, n + padded, self.batch)]
        return np.concatenate(chunks)[:n].astype(np.float32, copy=False)


def embed(model, sentences: list[str]) -> np.ndarray:
    """`sentence_embedding` of each sentence: float32 [len(sentences), 384].

    `model` is a path, serialized bytes or an onnx.ModelProto with static [batch, seq_len]
    inputs; sentences are tokenized to that seq_len and run `batch` at a time.
    """
    return _Runner(model).embed(sentences)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of matching rows, renormalized: a compressed model's outputs may drift off norm 1."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def cosine_to_reference(candidate_model, reference_model=None, sentences=None) -> dict:
    """{"cosine_mean", "cosine_min", "sentences"} of candidate vs reference on `sentences`
    (default EVAL_SENTENCES; `models.minilm.corpus.held_out_everyday()` is a second, larger set).

    The reference defaults to the uncompressed model built (cached) for the candidate's static
    shapes.
    """
    sentences = EVAL_SENTENCES if sentences is None else list(sentences)
    candidate = _Runner(candidate_model)
    if reference_model is None:
        reference_model = model_path(seq_len=candidate.seq_len, batch=candidate.batch)
    cos = _row_cosine(candidate.embed(sentences), embed(reference_model, sentences))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "sentences": len(sentences)}


def ranking_accuracy(model) -> float:
    """Fraction of RANKING_TRIPLES with cos(anchor, positive) > cos(anchor, negative)."""
    k = len(RANKING_TRIPLES)
    emb = embed(model, [s for triple in RANKING_TRIPLES for s in triple]).reshape(k, 3, -1)
    anchor, positive, negative = emb[:, 0], emb[:, 1], emb[:, 2]
    return float(np.mean(_row_cosine(anchor, positive) > _row_cosine(anchor, negative)))


def calibration_npz(path, n: int = 32, seq_len: int = 128, corpus: str = "auto") -> Path:
    """Write `n` calibration samples as a `--calib` .npz and return its path.

    corpus="sentences": the first `n` CALIBRATION_SENTENCES (48 at most, ~860 real tokens);
    corpus="prose": `models.minilm.corpus.calibration_texts(n)` — single sentences of English
    prose (stdlib/scikit-learn documentation, ~23 tokens each), one everyday sentence in eight;
    corpus="passages": the same prose packed into ~110-word passages that fill most of a
    128-token sequence; corpus="everyday": `models.minilm.corpus.everyday_texts(n)` — everyday
    English sentences and short snippets (n <= ~17860), the kind of text the model embeds in use;
    "auto" picks sentences for n <= 48 and prose above.
    Keys are the graph input names; each array is int64 [n, seq_len], i.e. one batch item per
    sample, which the project's CalibrationSet groups into the model's static batch size.
    """
    if corpus == "auto":
        corpus = "sentences" if n <= len(CALIBRATION_SENTENCES) else "prose"
    if corpus == "sentences":
        if not 1 <= n <= len(CALIBRATION_SENTENCES):
            raise ValueError(f"n must be in 1..{len(CALIBRATION_SENTENCES)}, got {n}")
        texts = CALIBRATION_SENTENCES[:n]
    elif corpus in ("prose", "passages"):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        from .corpus import calibration_texts
        texts = calibration_texts(n, words=0 if corpus == "prose" else 110)
    elif corpus == "everyday":
        from .corpus import everyday_texts
        texts = everyday_texts(n)
    else:
        raise ValueError(f"corpus must be auto, sentences, prose, passages or everyday, "
                         f"got {corpus!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, **tokenize(texts, seq_len))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m models.minilm.evaluate",
        description="Cosine similarity to the uncompressed all-MiniLM-L6-v2 and ranking accuracy.")
    parser.add_argument("model", help="candidate .onnx model with static [batch, seq_len] inputs")
    parser.add_argument("--reference", help="reference .onnx (default: the uncompressed model "
                                            "built for the candidate's shapes)")
    args = parser.parse_args(argv)
    cos = cosine_to_reference(args.model, args.reference)
    print(f"cosine_mean={cos['cosine_mean']:.6f} cosine_min={cos['cosine_min']:.6f} "
          f"ranking={ranking_accuracy(args.model):.3f}")


if __name__ == "__main__":
    main()
