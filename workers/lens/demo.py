"""The demo model lens-server builds for itself, since no model hub is reachable.

A word-level tokenizer over a few dozen English words and a Llama of 3 layers × 8
heads, trained for about a minute of CPU time on two tasks:

- copy a random word sequence after a separator: ``red cat blue dog | red cat blue``
  → ``dog``. Copying needs induction heads (a previous-token head, then a head that
  attends to the token after the current token's earlier occurrence). The training
  copies skip the next word now and then (``SKIP``, at each word), so the model also
  keeps a weaker mechanism that predicts the word after next: on the clean copies the
  analyses use, those heads only hurt;
- the aba/abb rule task of the CHG paper, in the authors' format
  (`` red^ cat^ red`` lines, see ``workers.lens.prompt_targets.generate_pattern``): each line's
  third word repeats its first (aba) or its second (abb), one rule per sequence. Its
  heads have nothing to do with copying.

So a chg fit on the copy task finds facilitating, irrelevant and interfering heads, each
with a known cause (``lens demo`` shows them, with the ablations that confirm each role;
``DEMO_CHG`` holds that fit's settings).

Targets are words; the service joins them to their prompt with a space
(``target_join="space"``), as users of the seed library write them (``"dog"``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from workers.lens.errors import InvalidParameter
from workers.lens.results import Progress, ProgressCallback, no_progress

logger = logging.getLogger(__name__)

VERSION = "2"
"""Bump when the vocabulary, architecture or training changes: it names the cache directory."""

CACHE_ENV = "LENS_DEMO_CACHE"
"""Environment variable naming the directory that holds cached demo models."""

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SEPARATOR = "|"
NEWLINE = "\n"
PERIOD = "."
MARK = "^"
"""Marks a word of the aba/abb task's rows (``red^ cat^ red``); a token of its own."""

WORDS: tuple[str, ...] = (
    # colours
    "red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "orange",
    "purple", "gold",
    # animals
    "cat", "dog", "fox", "owl", "bat", "cow", "pig", "hen", "ant", "bee", "bear", "deer",
    "duck", "frog", "goat", "lion", "mouse", "seal", "swan", "wolf", "horse", "sheep",
    # fruit
    "apple", "pear", "plum", "fig", "lime", "lemon", "grape", "peach", "mango", "kiwi",
    "melon", "cherry",
    # things
    "cup", "hat", "box", "key", "pen", "map", "bell", "book", "boat", "car", "drum", "lamp",
    "ring", "sock", "chair", "door",
    # nature
    "sun", "moon", "star", "tree", "leaf", "rock", "sand", "rain", "snow", "fire", "river",
    "hill",
    # numbers
    "one", "two", "three", "four", "five", "six",
)  # fmt: skip
"""The words of the vocabulary; each one is a single token."""

MIN_COPY_LENGTH = 3
MAX_COPY_LENGTH = 8
"""Lengths of the word sequences the model learned to copy."""
MIN_PATTERN_LINES = 2
MAX_PATTERN_LINES = 5
"""Lines per aba/abb sequence in training (``generate_pattern`` writes five)."""

TASKS = ("skipping copy", "skipping copy", "pattern")
"""A training batch cycles through these: two thirds copies, one third aba/abb rows."""
SKIP = 0.2
"""Chance that a training copy skips the next word (``w1 w3 …``), at each word."""
EVAL_TASKS = ("copy", "pattern")
"""Held-out accuracy is measured on clean copies."""
"""A training batch cycles through these: half copy, a quarter each reverse and aba/abb."""
LAYERS = 3
HEADS = 8
HIDDEN = 64
MAX_POSITIONS = 128
DEFAULT_STEPS = 500
BATCH_SIZE = 64
LEARNING_RATE = 5e-3
TRAIN_THREADS = 1
"""One thread: the model is so small that more threads only add synchronisation, and on a
busy shared CPU two threads trained ten times slower than one."""
EVAL_SEQUENCES = 256

DEMO_CHG = {
    "prompts": 256,
    "data_seed": 7,
    "num_masks": 4,
    "num_updates": 300,
    "batch_size": 16,
    "seed": 0,
}
"""The chg fit ``lens demo`` runs on the copy task (``copy_task_examples``), and the tests
check: its prompts, their seed and the fit's settings."""

DEMO_TEXTS: tuple[str, ...] = (
    "red cat blue dog | red cat blue dog",
    "apple lion green moon fox | apple lion green moon fox",
    "sun tree cup hat bee five | sun tree cup hat",
    "one two three four five six | one two three",
)
"""Readable texts for score and trace demos; copies, complete or cut short."""


@dataclass(frozen=True)
class _Batch:
    """``input_ids`` [batch, seq], right-padded; ``scored`` [batch, seq] marks positions
    whose next token the task determines (the loss and the accuracy count only those)."""

    input_ids: torch.Tensor
    scored: torch.Tensor


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's word-level tokenizer: words split on spaces, ``\\n`` a token of its own."""
    tokens = [PAD, BOS, EOS, UNK, NEWLINE, SEPARATOR, PERIOD, MARK, *WORDS]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(NEWLINE, behavior="isolated"),
            pre_tokenizers.Split(MARK, behavior="isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    # Decoding joins words with one space but none around a newline or before a mark, so
    # texts round-trip.
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(Regex(r"^(?=[^\n])"), " "),
            decoders.Fuse(),
            decoders.Replace("\n ", "\n"),
            decoders.Replace(f" {MARK}", MARK),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def _build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _copy_words(rng: random.Random, length: int) -> list[str]:
    """``length`` distinct words, so every copied word has one unambiguous successor."""
    return rng.sample(WORDS, length)


def copy_task_examples(n: int, *, seed: int, length: int = 6) -> tuple[list[str], list[str]]:
    """``n`` copy prompts cut in the middle of the copy, and each one's next word.

    A prompt is ``w1 … wL | w1 … wk`` with 1 ≤ k < L; its target is the word
    ``w(k+1)``, written as the seed library's users write targets (no leading space: the
    default ``target_join="space"`` joins it).
    """
    if n < 1:
        raise InvalidParameter("n", f"must be at least 1, got {n}")
    if not MIN_COPY_LENGTH <= length <= MAX_COPY_LENGTH:
        raise InvalidParameter(
            "length", f"must be in [{MIN_COPY_LENGTH}, {MAX_COPY_LENGTH}], got {length}"
        )
    rng = random.Random(f"copy-examples-{seed}")
    prompts, targets = [], []
    for _ in range(n):
        words = _copy_words(rng, length)
        cut = rng.randint(1, length - 1)
        prompts.append(" ".join([*words, SEPARATOR, *words[:cut]]))
        targets.append(words[cut])
    return prompts, targets


def _copy_row(
    rng: random.Random, vocab: dict[str, int], skip: float = 0.0
) -> tuple[list[int], list[int]]:
    """``<bos> w1 … wn | w1 … wn``, and the positions that predict a copied word. With
    probability ``skip`` per word the copy skips the next word (``w1 w3 …``)."""
    words = [vocab[w] for w in _copy_words(rng, rng.randint(MIN_COPY_LENGTH, MAX_COPY_LENGTH))]
    n = len(words)
    copied, i = [], 0
    while i < n:
        copied.append(words[i])
        i += 2 if i + 2 < n and rng.random() < skip else 1
    return [vocab[BOS], *words, vocab[SEPARATOR], *copied], list(range(n + 1, n + len(copied) + 1))


def _pattern_row(rng: random.Random, vocab: dict[str, int]) -> tuple[list[int], list[int]]:
    """``<bos> a ^ b ^ a \\n c ^ d ^ c …`` under one rule, and the positions that predict
    a third word after the first line (the first line's is a guess between two)."""
    third = rng.randint(0, 1)
    row, scored = [vocab[BOS]], []
    for line in range(rng.randint(MIN_PATTERN_LINES, MAX_PATTERN_LINES)):
        a, b = (vocab[w] for w in rng.sample(WORDS, 2))
        if line:
            row.append(vocab[NEWLINE])
        row += [a, vocab[MARK], b, vocab[MARK]]
        if line:
            scored.append(len(row) - 1)
        row.append((a, b)[third])
    return row, scored


def _batch(rng: random.Random, vocab: dict[str, int], size: int, task: str | None) -> _Batch:
    """A batch of one task's rows, or of the training mix (``TASKS``, when ``task`` is None)."""
    makers: dict[str, Callable[[random.Random, dict[str, int]], tuple[list[int], list[int]]]] = {
        "copy": _copy_row,
        "skipping copy": partial(_copy_row, skip=SKIP),
        "pattern": _pattern_row,
    }
    rows = [makers[task or TASKS[i % len(TASKS)]](rng, vocab) for i in range(size)]
    seq = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((size, seq), vocab[PAD], dtype=torch.long)
    scored = torch.zeros(size, seq, dtype=torch.bool)
    for i, (ids, positions) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        scored[i, positions] = True
    return _Batch(input_ids=input_ids, scored=scored)


def _loss(model: LlamaForCausalLM, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL and accuracy [] over the scored positions' next tokens.

    Right padding needs no attention mask: causal attention keeps real tokens from
    seeing the pads after them, and pad positions are never scored.
    """
    logits = model(input_ids=batch.input_ids).logits[:, :-1]
    scored = batch.scored[:, :-1]
    predicted, wanted = logits[scored], batch.input_ids[:, 1:][scored]
    loss = torch.nn.functional.cross_entropy(predicted, wanted)
    accuracy = (predicted.argmax(dim=-1) == wanted).float().mean()
    return loss, accuracy


@contextmanager
def _cpu_threads(threads: int) -> Iterator[None]:
    """Train on a fixed number of threads, then give the caller back its setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(
    model: LlamaForCausalLM,
    vocab: dict[str, int],
    steps: int,
    seed: int,
    progress: ProgressCallback,
) -> float:
    """AdamW with a one-cycle schedule on fresh copy batches; returns the last loss."""
    rng = random.Random(f"demo-train-{seed}")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.98), weight_decay=0.01
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.1
    )
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        loss, _ = _loss(model, _batch(rng, vocab, BATCH_SIZE, None))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress(Progress(stage="demo", step=step + 1, total=steps, loss=loss.item()))
    model.eval()
    return loss.item()


@torch.no_grad()
def _held_out_accuracy(
    model: LlamaForCausalLM, vocab: dict[str, int], seed: int, task: str
) -> float:
    """Next-token accuracy of one task's scored positions, on sequences never trained on."""
    batch = _batch(random.Random(f"demo-eval-{task}-{seed}"), vocab, EVAL_SEQUENCES, task)
    return _loss(model, batch)[1].item()


def build_demo_model(
    path: Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Train the demo model and save it, with its tokenizer and ``demo.json``, into ``path``.

    Built in a temporary directory beside ``path`` and renamed into place, so a
    crash never leaves a half-written model; an existing ``path`` is replaced.
    Deterministic for a given seed and step count: trained on the CPU, on one thread.
    """
    steps = DEFAULT_STEPS if steps is None else steps
    if steps < 1:
        raise InvalidParameter("steps", f"must be at least 1, got {steps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    with torch.random.fork_rng(devices=[]), _cpu_threads(TRAIN_THREADS):
        torch.manual_seed(seed)
        model = _build_model(tokenizer)
        final_loss = _train(model, vocab, steps, seed, progress or no_progress)
        accuracy = {task: _held_out_accuracy(model, vocab, seed, task) for task in EVAL_TASKS}
    seconds = time.monotonic() - started
    logger.info("demo model: %d steps in %.1f s, held-out accuracy %s", steps, seconds, accuracy)
    info = {
        "version": VERSION,
        "tasks": {
            "copy": "w1 … wn | w1 … wn: copy distinct random words after the separator",
            "pattern": "a^ b^ a lines (aba) or a^ b^ b lines (abb), one rule per sequence",
        },
        "words": list(WORDS),
        "separator": SEPARATOR,
        "mark": MARK,
        "min_length": MIN_COPY_LENGTH,
        "max_length": MAX_COPY_LENGTH,
        "target_convention": "word targets, joined to their prompt with a space ('dog')",
        "seed": seed,
        "steps": steps,
        "final_loss": final_loss,
        "accuracy": accuracy,
        "copy_accuracy": accuracy["copy"],
        "build_seconds": round(seconds, 1),
    }
    _save_atomically(path, model, tokenizer, info)
    return path


def _save_atomically(
    path: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, info: dict[str, object]
) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a service's other users
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "demo.json").write_text(json.dumps(info, indent=2) + "\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            path.rename(old / path.name)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def default_cache_dir() -> Path:
    """``$LENS_DEMO_CACHE`` if set, else ``~/.cache/lens-server``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "lens-server"


def is_demo_model(path: Path) -> bool:
    """Whether ``path`` holds a finished demo model (``demo.json`` is written last)."""
    return (Path(path) / "demo.json").is_file()


def ensure_demo_model(
    cache_dir: Path | None = None, *, progress: ProgressCallback | None = None
) -> Path:
    """The cached demo model's directory, ``<cache_dir>/demo-<VERSION>``, built once if missing.

    ``cache_dir`` defaults to :func:`default_cache_dir`. A file lock makes
    concurrent callers (several workers starting at once) build it only once.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"demo-{VERSION}"
    if is_demo_model(path):
        return path
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"demo-{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_demo_model(path):
            logger.info("building the demo model into %s", path)
            build_demo_model(path, progress=progress)
    return path
