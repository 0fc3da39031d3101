"""Everything that lists job kinds agrees with the kind table (``app.kinds``).

Each check is a function that returns its problems, each naming the kind and what is
missing, and is run twice: on the real code, where it must find nothing, and on a
deliberately broken copy, where it must report the break (so no check passes vacuously).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, get_args, get_type_hints

from pydantic import BaseModel

import app.client
from app.cli import jobs as cli_jobs
from app.client import AsyncJob, AsyncLensClient, AsyncModel, Job, LensClient, Model
from app.client import _kinds as builders
from app.client._kinds import JobSpec
from app.client.results import RESULT_TYPES, Result
from app.core import jobsize
from app.kinds import KINDS
from app.schemas import REQUEST_MODELS
from workers.handlers import HANDLERS

KIND_NAMES = [kind.value for kind in KINDS]
DASHBOARD_JS = Path(__file__).parents[2] / "app" / "static" / "dashboard.js"
WAIT_PARAMS = {"progress", "on_progress", "timeout", "verbose"}
"""Builder parameters that say how to wait, not what to compute."""
NOT_PARAMS = {"kind", "model"}
"""Request fields every kind has, which the client fills in itself."""


def table_problems(what: str, keys: Iterable[str], kinds: Iterable[str] = KIND_NAMES) -> list[str]:
    """A table keyed by kind must hold every kind, and nothing else."""
    keys, kinds = {str(k) for k in keys}, [str(k) for k in kinds]
    found = [f"kind '{k}': missing from {what}" for k in kinds if k not in keys]
    return found + [
        f"{what} has '{k}', which app.kinds does not declare"
        for k in sorted(keys)
        if k not in kinds
    ]


def draw_keys(source: str) -> list[str]:
    """The keys of the dashboard's ``const DRAW = {...}``."""
    body = re.search(r"const DRAW\s*=\s*\{(.*?)\}", source, re.DOTALL)
    assert body is not None, "dashboard.js has no `const DRAW = {...}`"
    return re.findall(r"(\w+)\s*:", body.group(1))


def cli_kind_choices(command: Callable[..., Any]) -> list[str]:
    """The kinds a CLI command's ``kind`` argument offers (its enum's values)."""
    choices = get_args(get_type_hints(command, include_extras=True)["kind"])[0]
    return [member.value for member in choices]


def result_type_problems(types: Mapping[str, type], exported: Iterable[str]) -> list[str]:
    found = table_problems("app.client.results.RESULT_TYPES", types)
    for kind, cls in types.items():
        if not (issubclass(cls, Result) and cls.kind == kind):
            found.append(f"kind '{kind}': result type {cls.__name__} has kind {cls.kind!r}")
        if cls.__name__ not in exported:
            found.append(f"kind '{kind}': result type {cls.__name__} is not exported by app.client")
    return found


def handler_problems(handlers: Mapping[str, Callable[..., Any]]) -> list[str]:
    found = table_problems("workers.handlers.HANDLERS", handlers)
    for kind, handler in handlers.items():
        path = f"{handler.__module__}.{handler.__name__}"
        if kind in KINDS and path != KINDS[kind].handler:
            found.append(
                f"kind '{kind}': HANDLERS has {path}, app.kinds names {KINDS[kind].handler}"
            )
    return found


def builder_methods(cls: type) -> dict[str, Callable[..., JobSpec]]:
    """The model handle's methods that run a job, and the builder each wraps."""
    return {
        name: member.__wrapped__
        for name, member in vars(cls).items()
        if callable(member) and hasattr(member, "__wrapped__")
    }


def built(build: Callable[..., JobSpec]) -> JobSpec:
    """What a builder makes when given every one of its parameters."""
    return build(**{name: 1 for name in inspect.signature(build).parameters})


def builder_problems(
    methods: Mapping[str, Callable[..., JobSpec]], models: Mapping[str, type[BaseModel]]
) -> list[str]:
    """Every kind has a client method; every builder parameter reaches the request and is
    a field of its kind's model; the kind's methods together cover every field."""
    found: list[str] = []
    covered: dict[str, set[str]] = {kind: set() for kind in models}
    for name, build in methods.items():
        spec = built(build)
        if spec.kind not in models:
            found.append(
                f"client method {name} builds '{spec.kind}', which app.kinds does not declare"
            )
            continue
        takes = set(inspect.signature(build).parameters) - WAIT_PARAMS
        fields = set(models[spec.kind].model_fields) - NOT_PARAMS
        if dropped := sorted(takes - set(spec.params)):
            found.append(f"kind '{spec.kind}': client method {name} drops its parameters {dropped}")
        if unknown := sorted(set(spec.params) - fields):
            found.append(
                f"kind '{spec.kind}': client method {name} sends {unknown}, not fields of its model"
            )
        covered[spec.kind] |= set(spec.params)
    for kind, model in models.items():
        if not any(built(b).kind == kind for b in methods.values()):
            found.append(f"kind '{kind}': no client method runs it")
        elif missing := sorted(set(model.model_fields) - NOT_PARAMS - covered[kind]):
            found.append(f"kind '{kind}': no client method takes its fields {missing}")
    return found


def twin_problems(sync: type, aio: type, *, renamed: Mapping[str, str] = {}) -> list[str]:
    """The async class has the sync class's public methods, built alike."""

    def public(cls: type) -> dict[str, Any]:
        return {
            n: m
            for n, m in vars(cls).items()
            if not n.startswith("_") and (callable(m) or isinstance(m, property))
        }

    mine, theirs = public(sync), public(aio)
    names = {renamed.get(n, n) for n in mine}
    found = [f"{aio.__name__} lacks {sync.__name__}.{n}" for n in sorted(names - set(theirs))]
    found += [f"{sync.__name__} lacks {aio.__name__}.{n}" for n in sorted(set(theirs) - names)]
    for name, method in mine.items():
        twin = theirs.get(renamed.get(name, name))
        if twin is None or isinstance(method, property) or isinstance(twin, property):
            continue
        ours, other = inspect.signature(method), inspect.signature(twin)
        if list(ours.parameters) != list(other.parameters):
            found.append(
                f"{name}: {sync.__name__} takes {list(ours.parameters)}, "
                f"{aio.__name__} {list(other.parameters)}"
            )
        if getattr(method, "__wrapped__", None) is not getattr(twin, "__wrapped__", None):
            found.append(f"{name}: {sync.__name__} and {aio.__name__} build different jobs")
        if not inspect.iscoroutinefunction(twin) and name != "model":
            found.append(f"{aio.__name__}.{name} is not a coroutine function")
    return found


def returns_problems(cls: type, wrap: str = "{}") -> list[str]:
    """Each job-running method is annotated to return its kind's result type."""
    found = []
    for name, build in builder_methods(cls).items():
        kind = built(build).kind
        want = wrap.format(RESULT_TYPES[kind].__name__) if kind in RESULT_TYPES else "?"
        got = inspect.signature(getattr(cls, name)).return_annotation
        if got != want:
            found.append(f"kind '{kind}': {cls.__name__}.{name} returns {got}, not {want}")
    return found


def cli_file_kind_problems(dataset_kinds: Iterable[str], text_kinds: Iterable[str]) -> list[str]:
    """The CLI's --file rules: data sets for kinds with a ``dataset`` field, texts for
    kinds whose ``texts`` is required."""
    with_dataset = {k for k, m in REQUEST_MODELS.items() if "dataset" in m.model_fields}
    with_texts = {
        k
        for k, m in REQUEST_MODELS.items()
        if "texts" in m.model_fields and m.model_fields["texts"].is_required()
    }
    found = []
    if set(dataset_kinds) != with_dataset:
        found.append(
            f"app.cli.jobs.DATASET_KINDS is {sorted(dataset_kinds)}, "
            f"kinds with a dataset field {sorted(with_dataset)}"
        )
    if set(text_kinds) != with_texts:
        found.append(
            f"app.cli.jobs.TEXT_KINDS is {sorted(text_kinds)}, "
            f"kinds that need texts {sorted(with_texts)}"
        )
    return found


REQUEST_BY_NAME = {kind.value: model for kind, model in REQUEST_MODELS.items()}


def test_the_dashboard_draws_every_kind() -> None:
    keys = draw_keys(DASHBOARD_JS.read_text())
    assert table_problems("dashboard.js DRAW", keys) == []
    assert table_problems("dashboard.js DRAW", [k for k in keys if k != "cchg"]) == [
        "kind 'cchg': missing from dashboard.js DRAW"
    ]


def test_the_cli_offers_every_kind() -> None:
    choices = cli_kind_choices(cli_jobs.submit)
    assert table_problems("lens submit's kinds", choices) == []
    assert table_problems("lens submit's kinds", [*choices, "bogus"]) == [
        "lens submit's kinds has 'bogus', which app.kinds does not declare"
    ]
    assert cli_file_kind_problems(cli_jobs.DATASET_KINDS, cli_jobs.TEXT_KINDS) == []
    assert len(cli_file_kind_problems(["chg"], cli_jobs.TEXT_KINDS)) == 1


def test_every_kind_has_a_result_type() -> None:
    assert result_type_problems(RESULT_TYPES, app.client.__all__) == []
    broken = {k: v for k, v in RESULT_TYPES.items() if k != "attribute"} | {
        "ablate": RESULT_TYPES["chg"]
    }
    assert result_type_problems(broken, app.client.__all__) == [
        "kind 'attribute': missing from app.client.results.RESULT_TYPES",
        "kind 'ablate': result type ChgResult has kind 'chg'",
    ]
    unexported = [n for n in app.client.__all__ if n != "ScoreResult"]
    assert result_type_problems(RESULT_TYPES, unexported) == [
        "kind 'score': result type ScoreResult is not exported by app.client"
    ]


def test_every_kind_has_its_handler() -> None:
    assert handler_problems(HANDLERS) == []
    swapped = {**HANDLERS, "score": HANDLERS["trace"]}
    assert handler_problems(swapped) == [
        "kind 'score': HANDLERS has workers.handlers.run_trace, "
        "app.kinds names workers.handlers.run_score"
    ]


def test_every_kind_is_sized() -> None:
    assert table_problems("jobsize.RESULT_ADVICE", jobsize.RESULT_ADVICE) == []
    assert table_problems("jobsize.MEMORY_ADVICE", jobsize.MEMORY_ADVICE) == []
    assert jobsize.TEXT_FIELDS.keys() == KINDS.keys()


def test_the_client_builds_every_field_of_every_kind() -> None:
    methods = builder_methods(Model)
    assert builder_problems(methods, REQUEST_BY_NAME) == []

    without_cchg = {n: b for n, b in methods.items() if n != "fit_contrastive"}
    assert builder_problems(without_cchg, REQUEST_BY_NAME) == [
        "kind 'cchg': no client method runs it"
    ]

    def score(
        texts: Any, *, temperature: Any = None, top_k: Any = None, timeout: Any = None
    ) -> JobSpec:
        return builders.JobSpec(
            "score",
            builders.params(texts=texts, temperature=temperature, top_n=top_k),
            builders.WaitOptions(),
        )

    assert builder_problems({**methods, "score": score}, REQUEST_BY_NAME) == [
        "kind 'score': client method score drops its parameters ['top_k']",
        "kind 'score': client method score sends ['top_n'], not fields of its model",
        "kind 'score': no client method takes its fields ['final_token_only', 'top_k']",
    ]
    grown = {
        **REQUEST_BY_NAME,
        "trace": type(
            "Grown", (REQUEST_BY_NAME["trace"],), {"__annotations__": {"stride": int}, "stride": 1}
        ),
    }
    assert builder_problems(methods, grown) == [
        "kind 'trace': no client method takes its fields ['stride']"
    ]


def test_the_sync_and_async_clients_are_twins() -> None:
    assert twin_problems(Model, AsyncModel) == []
    assert twin_problems(Job, AsyncJob) == []
    assert twin_problems(LensClient, AsyncLensClient, renamed={"close": "aclose"}) == []
    assert returns_problems(Model) == []
    assert returns_problems(AsyncModel, "Awaitable[{}]") == []

    kept = {n: m for n, m in vars(AsyncModel).items() if not n.startswith("__") and n != "trace"}
    Lacking = type("Lacking", (), kept | {"ablate": AsyncModel.score})
    assert twin_problems(Model, Lacking) == [
        "Lacking lacks Model.trace",
        "ablate: Model takes "
        f"{list(inspect.signature(Model.ablate).parameters)}, Lacking "
        f"{list(inspect.signature(AsyncModel.score).parameters)}",
        "ablate: Model and Lacking build different jobs",
    ]
    assert returns_problems(Lacking, "{}")[0].startswith(
        "kind 'chg': Lacking.fit returns Awaitable[ChgResult]"
    )


def test_the_client_reads_the_kind_table_without_pydantic() -> None:
    """The kind table imports nothing, so the client and its CLI stay free of the server's
    schemas (and of pydantic)."""
    code = (
        "import sys, app.client, app.cli.jobs; "
        "print(','.join(m for m in ('pydantic', 'app.schemas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
