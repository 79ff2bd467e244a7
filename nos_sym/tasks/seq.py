r"""The task ``seq``: a small Transformer translating a synthetic language pair, scored by BLEU —
a CPU-sized **stand-in for the paper's GNMT on WMT'14 English→German** (Bello et al. 2017,
section 5.3), not a reproduction of it.

**Data** (no download; :func:`corpus`): sentence pairs drawn from a small grammar with a fixed
generator seed (``data_seed``, part of the task's identity). The source is English-like, subject –
verb – object with an optional prepositional phrase (determiners or numbers, up to two adjectives
before the noun, plural nouns, verb agreement). The target has its own word-by-word lexicon
(:data:`LEXICON`) and grammar: verb last (SOV), adjectives after the noun, the prepositional phrase
before the object with a postposition, determiners that agree with the noun's gender, number and
case (nominative, accusative, dative), adjective endings by gender and number and verb endings by
the subject's number. So a model must learn to reorder (attention) and to inflect, not to copy.
The train, validation and test splits hold distinct source sentences. Sentences are text; BLEU is
computed on them as written (detokenized).

**Model** (:class:`Seq2Seq`): a pre-LN Transformer encoder–decoder from ``torch.nn``
(``d_model``, ``heads``, ``layers`` each side, feed-forward 2·``d_model``, learned positions, no
dropout), initialised from the evaluation's ``seed`` (the same weights for every learning rate and
the final run), trained with teacher forcing on the token cross-entropy

.. math::

    \mathcal{L} = -\frac{1}{N}\sum_{n}\log p_\theta(y_n \mid y_{<n}, x)

over the non-padding target tokens of a batch, the batches in the seeded order of
:func:`~nos_sym.evaluation.protocol.epoch_order`, the gradient's global norm clipped to ``clip``
before each step (GNMT clips too; 0: no clipping), so that SGD-like rules can take large
learning rates.

**Metric**: corpus BLEU (sacrebleu, 0–100) of greedy decodes of the validation split at the end
of the run; the final run also reports the BLEU at ``curve_points`` evenly spaced steps (the
curve, its last point the metric) and on the test split (reported, never used to choose). A
non-finite loss or parameter is a diverged run (metric 0).

**Steps**: ``epochs · ⌊examples / batch⌋`` of the protocol, where a run's examples are the
protocol's (``sweep_examples``, ``final_examples``; None: the whole training split) capped at
``train_size`` (:meth:`TranslationTask.steps`). The task reads the protocol's learning rates,
epochs, examples and batch size; its validation split is its own (``valid_size``), and it always
trains in fp32 (the protocol's ``n_valid``, ``split_seed``, ``precision`` and ``memory_format``
are the child network's settings; :data:`PROTOCOL` sets them to what this task does).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from nos_sym.evaluation.protocol import Protocol, derived_seed, epoch_order
from nos_sym.tasks.base import MakeOptimizer, Task, TaskRun

__all__ = [
    "LEXICON",
    "PROTOCOL",
    "Corpus",
    "Seq2Seq",
    "TranslationTask",
    "bleu",
    "corpus",
    "sentence_pair",
    "tokens",
]

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<s>", "</s>")

# English noun → (target stem, gender); English plural is "+s" unless listed in _PLURALS.
_NOUNS = {
    "cat": ("mira", "f"), "dog": ("boro", "m"), "bird": ("tavi", "n"), "teacher": ("lenko", "m"),
    "child": ("pima", "n"), "farmer": ("gosu", "m"), "girl": ("nela", "f"), "boy": ("kuro", "m"),
    "horse": ("vada", "n"), "king": ("rego", "m"), "queen": ("sira", "f"), "fish": ("peso", "m"),
    "house": ("domi", "f"), "tree": ("arbo", "m"), "river": ("fluma", "f"), "book": ("libo", "n"),
    "garden": ("kurta", "m"), "city": ("urba", "f"), "table": ("mesa", "f"), "apple": ("poma", "n"),
    "doctor": ("medo", "m"), "sister": ("sora", "f"), "baker": ("pano", "m"), "lamb": ("agno", "n"),
    "ship": ("navi", "f"), "stone": ("petro", "m"), "letter": ("litra", "f"), "wolf": ("lupo", "m"),
}  # fmt: skip
_PLURALS = {"child": "children", "fish": "fish", "city": "cities", "wolf": "wolves"}
_ADJECTIVES = {
    "big": "grand", "small": "pik", "red": "rud", "old": "alt", "young": "jun",
    "happy": "fel", "quick": "rap", "quiet": "kal", "green": "verd", "dark": "nox",
    "tall": "lang", "poor": "pov", "rich": "dit", "strange": "strang", "white": "blank",
}  # fmt: skip
# English verb (3rd person singular, base form, past) → target stem
_VERBS = {
    ("sees", "see", "saw"): "vid", ("likes", "like", "liked"): "am",
    ("follows", "follow", "followed"): "seg", ("finds", "find", "found"): "trov",
    ("helps", "help", "helped"): "aid", ("carries", "carry", "carried"): "port",
    ("watches", "watch", "watched"): "obs", ("calls", "call", "called"): "klam",
    ("knows", "know", "knew"): "sap", ("meets", "meet", "met"): "renk",
    ("draws", "draw", "drew"): "pint", ("feeds", "feed", "fed"): "nutr",
}  # fmt: skip
_PREPOSITIONS = {"near": "apud", "under": "sub", "behind": "post", "with": "kun", "in": "ini"}
_NUMBERS = {
    "two": "du", "three": "tri", "four": "kvar", "five": "kvin",
    "six": "ses", "seven": "sep", "eight": "ok", "nine": "nau",
}  # fmt: skip
# determiner by (definite?, case) → by gender ("p" = plural)
_ARTICLES = {
    (True, "nom"): {"m": "lo", "f": "la", "n": "le", "p": "li"},
    (True, "acc"): {"m": "lon", "f": "lan", "n": "len", "p": "lin"},
    (True, "dat"): {"m": "lom", "f": "lar", "n": "lom", "p": "lim"},
    (False, "nom"): {"m": "un", "f": "una", "n": "une"},
    (False, "acc"): {"m": "unon", "f": "unan", "n": "unen"},
    (False, "dat"): {"m": "unom", "f": "unar", "n": "unom"},
}
_ADJECTIVE_ENDINGS = {"m": "o", "f": "a", "n": "e", "p": "i"}

LEXICON: dict[str, str] = {
    **{noun: stem for noun, (stem, _) in _NOUNS.items()},
    **_ADJECTIVES,
    **{base: stem for (_, base, _), stem in _VERBS.items()},
    **_PREPOSITIONS,
    **_NUMBERS,
}
"""The word-by-word lexicon, English lemma → target stem (inflection adds endings)."""


def _noun_phrase(rng: random.Random, case: str) -> tuple[str, str, bool]:
    """One random noun phrase: (English, target in ``case``, whether it is plural)."""
    noun = rng.choice(sorted(_NOUNS))
    stem, gender = _NOUNS[noun]
    adjectives = rng.sample(sorted(_ADJECTIVES), rng.choice((0, 0, 1, 1, 2)))
    kind = rng.choice(("the", "the", "a", "number"))
    plural = kind == "number" or (kind == "the" and rng.random() < 0.4)
    agreement = "p" if plural else gender
    if kind == "number":
        number = rng.choice(sorted(_NUMBERS))
        source_det, target_det = number, _NUMBERS[number]
    else:
        source_det, target_det = kind, _ARTICLES[(kind == "the", case)][agreement]
    source_noun = _PLURALS.get(noun, noun + "s") if plural else noun
    target_noun = stem + "n" if plural else stem
    endings = _ADJECTIVE_ENDINGS[agreement]
    source = [source_det, *adjectives, source_noun]
    target = [target_det, target_noun, *(_ADJECTIVES[a] + endings for a in adjectives)]
    return " ".join(source), " ".join(target), plural


def sentence_pair(rng: random.Random) -> tuple[str, str]:
    """One random (English-like source, target) sentence pair, e.g. ``("the big dog sees two red
    cats near the river.", "lo boro grando lar fluma apud du miran rudi vidat.")``."""
    subject, subject_target, plural_subject = _noun_phrase(rng, "nom")
    (singular, base, past), stem = rng.choice(sorted(_VERBS.items()))
    tense, negated = rng.choice(("present", "past")), rng.random() < 0.25
    if negated:
        auxiliary = "did" if tense == "past" else "do" if plural_subject else "does"
        verb = f"{auxiliary} not {base}"
    else:
        verb = past if tense == "past" else base if plural_subject else singular
    ending = ("i" if tense == "past" else "a") + ("nt" if plural_subject else "t")
    obj, obj_target, _ = _noun_phrase(rng, "acc")
    source = [subject, verb, obj]
    target = [subject_target]
    if rng.random() < 0.5:
        preposition = rng.choice(sorted(_PREPOSITIONS))
        place, place_target, _ = _noun_phrase(rng, "dat")
        source += [preposition, place]
        target += [place_target, _PREPOSITIONS[preposition]]
    target += [obj_target, *(["ne"] * negated), stem + ending]
    return " ".join(source) + ".", " ".join(target) + "."


def tokens(sentence: str) -> list[str]:
    """The words of a sentence, the full stop a token of its own."""
    return sentence.replace(".", " .").split()


@dataclass(frozen=True)
class Corpus:
    """Sentence pairs of each split (text) and their token ids: ``source[split]`` a padded
    ``[N, L]`` tensor, ``target[split]`` ``<s> y </s>`` padded, ``*_lengths`` their lengths."""

    text: Mapping[str, tuple[tuple[str, str], ...]]
    source_vocab: tuple[str, ...]
    target_vocab: tuple[str, ...]
    source: Mapping[str, Tensor]
    target: Mapping[str, Tensor]
    source_lengths: Mapping[str, Tensor]
    target_lengths: Mapping[str, Tensor]


def _encoded(sentences: Sequence[str], vocab: Sequence[str], ends: bool) -> tuple[Tensor, Tensor]:
    index = {word: i for i, word in enumerate(vocab)}
    rows = [[index[w] for w in tokens(s)] for s in sentences]
    if ends:
        rows = [[BOS, *row, EOS] for row in rows]
    out = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out, torch.tensor([len(row) for row in rows])


@functools.lru_cache(maxsize=4)
def corpus(data_seed: int, train_size: int, valid_size: int, test_size: int) -> Corpus:
    """``train_size + valid_size + test_size`` distinct sentence pairs drawn by
    :func:`sentence_pair` from ``random.Random(data_seed)``, split in that order (cached)."""
    rng = random.Random(data_seed)
    sizes = {"train": train_size, "valid": valid_size, "test": test_size}
    pairs: dict[str, tuple[str, str]] = {}
    for _ in range(100 * sum(sizes.values())):
        if len(pairs) == sum(sizes.values()):
            break
        source, target = sentence_pair(rng)
        pairs.setdefault(source, (source, target))
    else:
        raise ValueError(f"the grammar gave only {len(pairs)} distinct sentences")
    ordered, text, start = list(pairs.values()), {}, 0
    for split, size in sizes.items():
        text[split], start = tuple(ordered[start : start + size]), start + size
    vocabs = [
        (*SPECIALS, *sorted({w for s in ordered for w in tokens(s[side])})) for side in (0, 1)
    ]
    encoded = {
        split: [
            _encoded([pair[side] for pair in text[split]], vocabs[side], side == 1)
            for side in (0, 1)
        ]
        for split in sizes
    }
    return Corpus(
        text=text,
        source_vocab=vocabs[0],
        target_vocab=vocabs[1],
        source={split: e[0][0] for split, e in encoded.items()},
        target={split: e[1][0] for split, e in encoded.items()},
        source_lengths={split: e[0][1] for split, e in encoded.items()},
        target_lengths={split: e[1][1] for split, e in encoded.items()},
    )


class Seq2Seq(nn.Module):
    """A pre-LN Transformer encoder–decoder: token + learned position embeddings, ``layers``
    encoder and decoder layers of width ``d_model`` (``heads`` heads, feed-forward 2·d_model),
    a linear output layer; no dropout."""

    def __init__(
        self,
        source_vocab: int,
        target_vocab: int,
        d_model: int,
        heads: int,
        layers: int,
        max_len: int,
    ) -> None:
        super().__init__()
        self.source_embedding = nn.Embedding(source_vocab, d_model, padding_idx=PAD)
        self.target_embedding = nn.Embedding(target_vocab, d_model, padding_idx=PAD)
        self.position = nn.Embedding(max_len, d_model)
        layer = {
            "dim_feedforward": 2 * d_model,
            "dropout": 0.0,
            "batch_first": True,
            "norm_first": True,
        }
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, heads, **layer),
            layers,
            norm=nn.LayerNorm(d_model),
            enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d_model, heads, **layer), layers, norm=nn.LayerNorm(d_model)
        )
        self.output = nn.Linear(d_model, target_vocab)

    def _embed(self, embedding: nn.Embedding, ids: Tensor) -> Tensor:
        return embedding(ids) + self.position.weight[: ids.shape[1]]

    def encode(self, source: Tensor) -> Tensor:
        """Memory ``[B, S, d]`` of source ids ``[B, S]``."""
        return self.encoder(
            self._embed(self.source_embedding, source), src_key_padding_mask=source == PAD
        )

    def decode(self, memory: Tensor, source: Tensor, target: Tensor) -> Tensor:
        """Next-token logits ``[B, T, V]`` after each prefix of ``target`` ``[B, T]``."""
        causal = nn.Transformer.generate_square_subsequent_mask(
            target.shape[1], device=memory.device, dtype=memory.dtype
        )
        hidden = self.decoder(
            self._embed(self.target_embedding, target),
            memory,
            tgt_mask=causal,
            tgt_is_causal=True,
            memory_key_padding_mask=source == PAD,
        )
        return self.output(hidden)

    def loss(self, source: Tensor, target: Tensor) -> Tensor:
        """Teacher-forced mean cross-entropy of ``target[:, 1:]`` given ``target[:, :-1]``."""
        logits = self.decode(self.encode(source), source, target[:, :-1])
        return nn.functional.cross_entropy(
            logits.flatten(0, 1), target[:, 1:].flatten(), ignore_index=PAD
        )

    @torch.inference_mode()
    def greedy(self, source: Tensor, max_len: int) -> list[list[int]]:
        """Greedy decodes of ``source`` ``[B, S]``: the ids up to (without) ``</s>``."""
        memory = self.encode(source)
        out = torch.full((source.shape[0], 1), BOS, dtype=torch.long, device=source.device)
        done = torch.zeros(source.shape[0], dtype=torch.bool, device=source.device)
        for _ in range(max_len - 1):
            step = self.decode(memory, source, out)[:, -1].argmax(-1).masked_fill(done, PAD)
            out = torch.cat((out, step[:, None]), dim=1)
            done |= step == EOS
            if bool(done.all()):
                break
        return [[i for i in row[1:] if i not in (PAD, EOS)] for row in out.tolist()]


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, 0–100) of ``hypotheses``."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def _detokenized(ids: Sequence[int], vocab: Sequence[str]) -> str:
    return " ".join(vocab[i] for i in ids).replace(" .", ".")


PROTOCOL = Protocol(
    name="seq",
    learning_rates=tuple(10.0**i for i in range(-4, 2)),
    sweep_examples=6_400,
    final_epochs=2,
    final_examples=6_400,
    batch_size=32,
    n_valid=400,
    precision="fp32",
    memory_format="contiguous",
)
"""The task's protocol: learning rates 1e-4 … 10 by decades; a sweep run is one epoch of 6,400
sentence pairs, the final run two (batch 32: 200 and 400 steps)."""


@dataclass(frozen=True)
class TranslationTask(Task):
    """The task ``seq`` (see the module docstring): a :class:`Seq2Seq` on :func:`corpus`,
    metric = validation BLEU of greedy decodes. Fields (spec options, part of the identity):
    the data (``data_seed``, split sizes), the model (``d_model``, ``heads``, ``layers``),
    ``curve_points`` (the BLEU points of a final run's curve) and ``clip`` (the gradient-norm
    clip, 0: none)."""

    data_seed: int = 0
    train_size: int = 6_400
    valid_size: int = 400
    test_size: int = 400
    d_model: int = 64
    heads: int = 4
    layers: int = 1
    curve_points: int = 4
    clip: float = 1.0

    name: ClassVar[str] = "seq"
    version: ClassVar[int | str] = 1
    protocols: ClassVar[Mapping[str, Protocol]] = {"seq": PROTOCOL}
    default_protocol: ClassVar[str] = "seq"

    def __post_init__(self) -> None:
        if min(self.train_size, self.valid_size, self.test_size, self.d_model, self.heads) < 1:
            raise ValueError("split sizes, d_model and heads must be positive")
        if self.layers < 1 or self.curve_points < 1 or self.d_model % self.heads:
            raise ValueError("layers and curve_points must be positive, heads must divide d_model")
        if not self.clip >= 0:
            raise ValueError(f"clip must be >= 0, got {self.clip}")

    def corpus(self) -> Corpus:
        """This task's sentence pairs (see :func:`corpus`)."""
        return corpus(self.data_seed, self.train_size, self.valid_size, self.test_size)

    def _examples(self, protocol: Protocol, final: bool) -> int:
        examples = protocol.final_examples if final else protocol.sweep_examples
        return min(examples or self.train_size, self.train_size)

    def steps(self, protocol: Protocol, final: bool) -> int:
        """``epochs · ⌊examples / batch⌋``, the examples of the protocol capped at
        ``train_size`` (at least one step)."""
        epochs = protocol.final_epochs if final else protocol.sweep_epochs
        return max(1, protocol.steps(epochs, self._examples(protocol, final)))

    def model(self, seed: int) -> Seq2Seq:
        """The network with the initial weights drawn from ``seed``."""
        data = self.corpus()
        max_len = max(t.shape[1] for t in (*data.source.values(), *data.target.values()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(seed, "seq", "init"))
            return Seq2Seq(
                len(data.source_vocab),
                len(data.target_vocab),
                self.d_model,
                self.heads,
                self.layers,
                max_len,
            )

    def score(self, model: Seq2Seq, split: str) -> float:
        """BLEU of the greedy decodes of ``split`` (``valid`` or ``test``)."""
        data = self.corpus()
        model.eval()
        source = data.source[split].to(model.output.weight.device)
        decoded = model.greedy(source, data.target[split].shape[1])
        model.train()
        hypotheses = [_detokenized(ids, data.target_vocab) for ids in decoded]
        return bleu(hypotheses, [target for _, target in data.text[split]])

    def run(
        self,
        make_optimizer: MakeOptimizer,
        *,
        lr: float,
        seed: int,
        steps: int,
        protocol: Protocol,
        final: bool,
        device: str = "cpu",
    ) -> TaskRun:
        data = self.corpus()
        model = self.model(seed).to(device)
        params = list(model.parameters())
        optimizer = make_optimizer(params)
        examples = self._examples(protocol, final)
        per_epoch = max(1, examples // protocol.batch_size)
        points = {math.ceil(k * steps / self.curve_points) for k in range(1, self.curve_points + 1)}
        source, target = data.source["train"].to(device), data.target["train"].to(device)
        source_lengths, target_lengths = data.source_lengths["train"], data.target_lengths["train"]
        curve: list[float] = []
        order = torch.empty(0, dtype=torch.long)
        for step in range(steps):
            epoch, batch = divmod(step, per_epoch)
            if batch == 0:
                order = epoch_order(seed, epoch, examples)
            rows = order[batch * protocol.batch_size : (batch + 1) * protocol.batch_size]
            on_device = rows.to(device)
            loss = model.loss(
                source[on_device, : int(source_lengths[rows].max())],
                target[on_device, : int(target_lengths[rows].max())],
            )
            if not torch.isfinite(loss):
                return TaskRun(metric=0.0, diverged=True)
            optimizer.zero_grad()
            loss.backward()
            if self.clip > 0:
                nn.utils.clip_grad_norm_(params, self.clip)
            optimizer.step()
            if final and step + 1 in points and step + 1 < steps:
                curve.append(self.score(model, "valid"))
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return TaskRun(metric=0.0, diverged=True)
        metric = self.score(model, "valid")
        if not final:
            return TaskRun(metric=metric)
        return TaskRun(metric=metric, curve=(*curve, metric), test=self.score(model, "test"))
