"""The demo model: its tokenizer, its full build, and evidence that attention does the copying."""

from __future__ import annotations

import fcntl
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tests.waiting import wait_until
from workers.lens import demo
from workers.lens.errors import Cancelled, InvalidParameter
from workers.lens.prompt_targets import encode_prompt_targets
from workers.lens.results import Progress

COPY_ACCURACY = 0.8
"""Of the next word on clean held-out copies: the training copies skip a word now and then
(``demo.SKIP``), so the model gives the word after next some probability too."""


@pytest.fixture(scope="module")
def built(demo_model_dir: Path) -> Path:
    """The session's full build (default steps), through the public entry point."""
    return demo_model_dir


@pytest.fixture(scope="module")
def loaded(built: Path):
    model = AutoModelForCausalLM.from_pretrained(built, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(built)


@torch.no_grad()
def next_word_accuracy(model, tokenizer, prompts: list[str], targets: list[str]) -> float:
    """Share of prompts whose greedy next token (at the last real token) is the target word."""
    enc = tokenizer(prompts, padding=True, padding_side="right", return_tensors="pt")
    logits = model(**enc).logits
    last = enc["attention_mask"].sum(dim=1) - 1
    predicted = logits[torch.arange(len(prompts)), last].argmax(dim=-1)
    wanted = torch.tensor(tokenizer.convert_tokens_to_ids([t.strip() for t in targets]))
    return (predicted == wanted).float().mean().item()


@contextmanager
def zeroed(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Replace each module's output by zeros."""
    with ExitStack() as stack:
        for module in modules:
            handle = module.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
            stack.callback(handle.remove)
        yield


def test_tokenizer_offsets_point_at_each_word() -> None:
    tokenizer = demo.build_tokenizer()
    texts = [*demo.DEMO_TEXTS, "red cat red\nblue dog blue\n\nfox owl", "  gold  star . "]
    for text in texts:
        enc = tokenizer(text, return_offsets_mapping=True)
        tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
        assert tokens[0] == demo.BOS and enc["offset_mapping"][0] == (0, 0)
        assert demo.UNK not in tokens
        assert [text[s:e] for s, e in enc["offset_mapping"][1:]] == tokens[1:]
        assert tokens[1:] == re.findall(r"\n|\S+", text)


def test_tokenizer_decodes_back_to_the_text() -> None:
    tokenizer = demo.build_tokenizer()
    for text in [*demo.DEMO_TEXTS, "red cat red\nblue dog blue\n\nfox owl"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_targets_are_words_of_one_token() -> None:
    tokenizer = demo.build_tokenizer()
    prompts, targets = demo.copy_task_examples(20, seed=3, length=8)
    batch = encode_prompt_targets(tokenizer, prompts, targets, torch.device("cpu"))
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        assert target in demo.WORDS
        n = batch.lengths[row]
        assert batch.input_ids[row, :n].tolist() == tokenizer(prompt)["input_ids"] + [
            tokenizer.convert_tokens_to_ids(target)
        ]
        assert batch.target_starts[row] == n - 1


def test_copy_examples_cut_a_copy_short() -> None:
    prompts, targets = demo.copy_task_examples(30, seed=1, length=5)
    assert (prompts, targets) == demo.copy_task_examples(30, seed=1, length=5)
    assert prompts != demo.copy_task_examples(30, seed=2, length=5)[0]
    for prompt, target in zip(prompts, targets, strict=True):
        source, copy = prompt.split(f" {demo.SEPARATOR} ")
        words, copied = source.split(), copy.split()
        assert len(words) == len(set(words)) == 5 and 1 <= len(copied) < 5
        assert copied == words[: len(copied)] and target == words[len(copied)]


@pytest.mark.parametrize(("n", "length"), [(0, 6), (3, 2), (3, demo.MAX_COPY_LENGTH + 1)])
def test_copy_examples_reject_bad_sizes(n: int, length: int) -> None:
    with pytest.raises(InvalidParameter):
        demo.copy_task_examples(n, seed=0, length=length)


def test_full_build_is_saved_as_safetensors_with_its_description(built: Path) -> None:
    assert built.name == f"demo-{demo.VERSION}"
    assert (built / "model.safetensors").is_file()
    assert not list(built.glob("*.bin"))
    info = json.loads((built / "demo.json").read_text())
    assert info["version"] == demo.VERSION and info["words"] == list(demo.WORDS)
    assert info["separator"] == demo.SEPARATOR and info["steps"] == demo.DEFAULT_STEPS
    assert info["copy_accuracy"] > COPY_ACCURACY
    assert set(info["accuracy"]) == set(demo.EVAL_TASKS)


@pytest.mark.parametrize(
    ("length", "accuracy"), [(3, COPY_ACCURACY), (5, COPY_ACCURACY), (8, 0.55)]
)
def test_loaded_model_copies_held_out_sequences(loaded, length: int, accuracy: float) -> None:
    """Longer copies give more chances to have learned a skip."""
    model, tokenizer = loaded
    prompts, targets = demo.copy_task_examples(200, seed=100 + length, length=length)
    assert next_word_accuracy(model, tokenizer, prompts, targets) > accuracy


def test_every_copied_word_is_predicted_from_the_copy(loaded) -> None:
    """Teacher-forced over each demo text's copied half, as the build's own figure is
    measured: each prediction is the next word, or (the copies the model learned from
    skip a word now and then) the word after it."""
    model, tokenizer = loaded
    for text in demo.DEMO_TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        with torch.no_grad():
            predicted = model(input_ids=ids[None]).logits[0].argmax(dim=-1).tolist()
        sep = ids.tolist().index(tokenizer.convert_tokens_to_ids(demo.SEPARATOR))
        source = ids[1:sep].tolist()
        for position in range(sep + 1, len(ids) - 1):
            k = source.index(int(ids[position]))
            assert predicted[position] in source[k + 1 : k + 3], (text, position)


def test_attention_does_the_copying(loaded) -> None:
    """Without the first layer's attention (previous-token heads) or the last one's
    (induction heads) the model cannot copy; the middle layer helps."""
    model, tokenizer = loaded
    prompts, targets = demo.copy_task_examples(200, seed=9, length=5)
    layers = model.model.layers
    accuracy = next_word_accuracy(model, tokenizer, prompts, targets)
    assert accuracy > COPY_ACCURACY
    for index, layer in enumerate(layers):
        with zeroed([layer.self_attn.o_proj]):
            without = next_word_accuracy(model, tokenizer, prompts, targets)
        assert without < (0.2 if index in (0, len(layers) - 1) else accuracy - 0.2)


def test_build_is_deterministic_and_reports_progress(tmp_path: Path) -> None:
    reports: list[Progress] = []
    first = demo.build_demo_model(tmp_path / "a", seed=5, steps=3, progress=reports.append)
    second = demo.build_demo_model(tmp_path / "b", seed=5, steps=3)
    assert [(p.stage, p.step, p.total) for p in reports] == [("demo", i, 3) for i in (1, 2, 3)]
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(demo.build_demo_model(tmp_path / "c", seed=6, steps=3) / "model.safetensors")
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "model"

    def cancel(_: Progress) -> None:
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        demo.build_demo_model(target, steps=2, progress=cancel)
    assert list(tmp_path.iterdir()) == []

    demo.build_demo_model(target, steps=1)
    before = sorted(p.name for p in target.iterdir())

    def broken_save(*_a, **_k) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        demo.build_demo_model(target, steps=1)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert sorted(p.name for p in target.iterdir()) == before


def fake_build(calls: list[Path], locking: Callable[[], bool] = lambda: True):
    """A build that records its calls, and finishes only once ``locking`` holds."""

    def build(path: Path, **_: object) -> Path:
        calls.append(path)
        wait_until(locking, 30, "every caller asked for the build's lock")
        path.mkdir(parents=True)
        (path / "demo.json").write_text("{}")
        return path

    return build


def test_ensure_builds_once_for_concurrent_callers(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    asked: list[int] = []
    flock = fcntl.flock

    def counted_flock(fd: Any, operation: int) -> None:
        if operation == fcntl.LOCK_EX:
            asked.append(operation)
        flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", counted_flock)
    monkeypatch.setattr(demo, "build_demo_model", fake_build(calls, lambda: len(asked) == 4))
    start = threading.Barrier(4)
    results: list[Path] = []

    def call() -> None:
        start.wait()
        results.append(demo.ensure_demo_model(tmp_path))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [tmp_path / f"demo-{demo.VERSION}"]
    assert results == calls * 4


def test_ensure_reuses_the_cache_and_honours_the_env_var(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(demo, "build_demo_model", fake_build(calls))
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "env-cache"))
    first = demo.ensure_demo_model()
    assert first == tmp_path / "env-cache" / f"demo-{demo.VERSION}"
    assert demo.ensure_demo_model() == first and calls == [first]
    monkeypatch.delenv(demo.CACHE_ENV)
    assert demo.default_cache_dir() == Path.home() / ".cache" / "lens-server"
