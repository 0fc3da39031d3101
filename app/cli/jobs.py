"""The ``lens`` commands that use a running server: models, submit, status, wait, result, jobs,
cancel, upload.

Human output is a rich table on stdout; ``--json`` prints JSON instead, and the
exit code tells a script what happened (see ``EXIT_CODES``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from app.client import (
    Conflict,
    InvalidRequest,
    Job,
    JobFailed,
    LensClient,
    LensError,
    NotFound,
    QuotaExceeded,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    VersionMismatch,
    WaitTimeout,
)
from app.client._http import DEFAULT_URL
from app.kinds import JobKind


class ExitCode(IntEnum):
    OK = 0
    JOB_FAILED = 1
    USAGE = 2
    NOT_FOUND = 3
    UNREACHABLE = 4
    UNAUTHORIZED = 5
    QUOTA = 6
    TIMEOUT = 7
    VERSION = 8
    NOT_FINISHED = 9
    SERVER_ERROR = 10


EXIT_CODES = (
    "Exit codes: 0 ok; 1 job failed or cancelled; 2 bad usage or parameters rejected; "
    "3 job, model or data set not found; 4 server unreachable or unavailable; "
    "5 API key missing or wrong; 6 over quota; 7 timed out waiting; "
    "8 client and server versions incompatible; 9 job not finished yet; 10 server error."
)

# Most specific first: VersionMismatch is an InvalidRequest, JobCancelled a JobFailed.
_ERROR_EXITS: tuple[tuple[type[LensError], ExitCode], ...] = (
    (JobFailed, ExitCode.JOB_FAILED),
    (VersionMismatch, ExitCode.VERSION),
    (InvalidRequest, ExitCode.USAGE),
    (NotFound, ExitCode.NOT_FOUND),
    (ServiceUnavailable, ExitCode.UNREACHABLE),
    (Unauthorized, ExitCode.UNAUTHORIZED),
    (QuotaExceeded, ExitCode.QUOTA),
    (WaitTimeout, ExitCode.TIMEOUT),
    (Conflict, ExitCode.NOT_FINISHED),
    (ServerError, ExitCode.SERVER_ERROR),
)


DATASET_KINDS = ("chg", "ablate")
TEXT_KINDS = ("score", "trace")

UrlOpt = Annotated[
    str, typer.Option("--url", envvar="LENS_URL", help="Server URL.", show_default=True)
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LENS_API_KEY", help="API key, if the server has keys."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")
]
TimeoutOpt = Annotated[
    float | None, typer.Option("--timeout", min=0, help="Give up waiting after this many seconds.")
]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _exit_code(exc: LensError) -> ExitCode:
    for cls, code in _ERROR_EXITS:
        if isinstance(exc, cls):
            return code
    return ExitCode.SERVER_ERROR


@contextmanager
def _client(url: str, api_key: str | None) -> Iterator[LensClient]:
    """A client whose errors end the command with a message and the matching exit code."""
    try:
        with LensClient(
            url, api_key or None, progress=sys.stderr.isatty(), tensors="numpy"
        ) as lens:
            yield lens
    except LensError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(_exit_code(exc)) from None


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _when(value: str | None, *, short: bool = False) -> str:
    """Local time; ``short``: the time alone for today, the date and minute otherwise."""
    if not value:
        return ""
    when = datetime.fromisoformat(value).astimezone()
    if not short:
        return when.strftime("%Y-%m-%d %H:%M:%S")
    today = when.date() == datetime.now().astimezone().date()
    return when.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M")


def _duration(doc: dict[str, Any]) -> str:
    if not doc.get("started_at") or not doc.get("finished_at"):
        return ""
    seconds = (
        datetime.fromisoformat(doc["finished_at"]) - datetime.fromisoformat(doc["started_at"])
    ).total_seconds()
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _progress(doc: dict[str, Any]) -> str:
    p = doc.get("progress")
    if not p:
        return f"queue #{doc['queue_position']}" if doc.get("queue_position") is not None else ""
    loss = f", loss {p['loss']:.4g}" if p.get("loss") is not None else ""
    return f"{p['stage']} {p['step']}/{p['total']}{loss}"


_STATUS_STYLE = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def _status(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _final_exit(doc: dict[str, Any]) -> ExitCode:
    if doc["status"] == "succeeded":
        return ExitCode.OK
    if doc["status"] in ("failed", "cancelled"):
        return ExitCode.JOB_FAILED
    return ExitCode.NOT_FINISHED


def _report_end(doc: dict[str, Any], as_json: bool, saved: Path | None = None) -> None:
    if as_json:
        _print_json({**doc, "output": str(saved)} if saved else doc)
        return
    line = f"job {doc['id']} {_status(doc['status'])}"
    if doc.get("error"):
        line += f": {escape(doc['error']['type'])}: {escape(doc['error']['message'])}"
    elif _duration(doc):
        line += f" in {_duration(doc)}"
    out.print(line)
    if saved:
        out.print(f"result saved to {escape(str(saved))}")


def _parse_value(text: str) -> Any:
    """JSON when it parses (numbers, lists, true/false), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _settings(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected key=value, got {pair!r}", param_hint="--set")
        params[key.strip()] = _parse_value(value)
    return params


def _texts_from(path: Path) -> list[str]:
    """Prompts from a .txt (one per line) or .jsonl (``prompt`` or ``text`` per row) file."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".txt":
        return lines
    texts = []
    for number, line in enumerate(lines, start=1):
        row = _parse_value(line)
        text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise typer.BadParameter(
                f"{path}:{number}: expected a JSON object with 'prompt' or 'text'",
                param_hint="--file",
            )
        texts.append(text)
    return texts


def _file_params(lens: LensClient, kind: JobKind, path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise typer.BadParameter(f"no such file: {path}", param_hint="--file")
    if path.suffix == ".json":
        params = json.loads(path.read_text())
        if not isinstance(params, dict):
            raise typer.BadParameter(f"{path} must hold a JSON object", param_hint="--file")
        return params
    if kind in DATASET_KINDS and path.suffix in (".jsonl", ".tsv"):
        return {"dataset": lens.upload_dataset(path)["id"]}
    if kind in TEXT_KINDS and path.suffix in (".jsonl", ".txt"):
        return {"texts": _texts_from(path)}
    raise typer.BadParameter(
        f"{kind} jobs take a .json file of parameters"
        + (", or a .jsonl/.tsv data set" if kind in DATASET_KINDS else "")
        + (", or a .jsonl/.txt file of texts" if kind in TEXT_KINDS else ""),
        param_hint="--file",
    )


def models(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """List the served models: shape, where they are loaded, how busy."""
    with _client(url, api_key) as lens:
        infos = lens.models()
    if as_json:
        _print_json(infos)
        return
    table = Table(
        "name", "architecture", "layers", "heads", "vocab", "device", "workers", "queued", "running"
    )
    for m in infos:
        table.add_row(
            m["name"], m.get("architecture") or "?", str(m.get("layers") or "?"),
            str(m.get("heads") or "?"), str(m.get("vocab_size") or "?"), m.get("device") or "",
            str(len(m.get("resident", []))) if m.get("worker_alive") else "[red]none[/]",
            str(m.get("queue_depth", 0)), str(m.get("running", 0)),
        )  # fmt: skip
    out.print(table)


def submit(
    kind: Annotated[JobKind, typer.Argument(help="Job kind.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Served model name.")],
    texts: Annotated[
        list[str] | None, typer.Option("--texts", "-t", help="A text (repeat for a batch).")
    ] = None,
    targets: Annotated[
        list[str] | None, typer.Option("--targets", help="A target per text (chg, ablate).")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            help="A .json object of parameters; for chg/ablate a .jsonl/.tsv data set (uploaded); "
            "for score/trace a .jsonl (prompt per row) or .txt (text per line) of texts.",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="key=value parameter, value as JSON if it parses."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait for the job to end.")] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Save the result here (implies --wait).")
    ] = None,
    timeout: TimeoutOpt = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job; with --wait or -o, wait for it (progress bar) and save its result."""
    with _client(url, api_key) as lens:
        params = _file_params(lens, kind, file) if file else {}
        if texts:
            params["texts"] = texts if len(texts) > 1 or kind in DATASET_KINDS else texts[0]
        if targets:
            params["targets"] = targets
        params |= _settings(set_ or [])
        job = lens.submit(kind.value, model, **params)
        if not (wait or output):
            _report_submitted(job, as_json)
            return
        if not as_json:
            err.print(f"submitted {kind} job {job.id}")
        _finish(job, timeout, output, as_json)


def _report_submitted(job: Job, as_json: bool) -> None:
    if as_json:
        _print_json(job.document)
    else:
        out.print(f"submitted {job.kind} job {job.id} ({_status(job.document['status'])})")


def _finish(job: Job, timeout: float | None, output: Path | None, as_json: bool) -> None:
    """Wait, report, save the result if asked; exit 1 unless the job succeeded."""
    job.wait(timeout)
    saved = job.download(output) if output and job.document["status"] == "succeeded" else None
    _report_end(job.document, as_json, saved)
    code = _final_exit(job.document)
    if code:
        raise typer.Exit(code)


JobIdArg = Annotated[str, typer.Argument(help="Job id.")]


def status(job_id: JobIdArg, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None,
           as_json: JsonOpt = False) -> None:  # fmt: skip
    """Show a job: status, queue position, progress, times, error, summary."""
    with _client(url, api_key) as lens:
        doc = lens.job(job_id).document
    if as_json:
        _print_json(doc)
        return
    table = Table(show_header=False, box=None)
    rows = {
        "id": doc["id"],
        "kind": doc["kind"],
        "model": doc["model"],
        "status": _status(doc["status"]),
        "progress": _progress(doc),
        "created": _when(doc.get("created_at")),
        "started": _when(doc.get("started_at")),
        "finished": _when(doc.get("finished_at")),
        "took": _duration(doc),
        "error": escape(f"{doc['error']['type']}: {doc['error']['message']}")
        if doc.get("error")
        else "",
        "tensors": ", ".join(doc.get("tensors") or {}),
        "summary": escape(json.dumps(doc["summary"])[:400]) if doc.get("summary") else "",
    }
    for key, value in rows.items():
        if value:
            table.add_row(f"[bold]{key}[/]", value)
    out.print(table)


def wait(job_id: JobIdArg, timeout: TimeoutOpt = None, url: UrlOpt = DEFAULT_URL,
         api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:  # fmt: skip
    """Wait for a job to end, with a progress bar; exit 0 only if it succeeded."""
    with _client(url, api_key) as lens:
        _finish(lens.job(job_id), timeout, None, as_json)


def result(
    job_id: JobIdArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default ID.safetensors).")
    ] = None,
    wait_: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait if the job is not done.")
    ] = False,
    timeout: TimeoutOpt = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a job's result (a safetensors file)."""
    with _client(url, api_key) as lens:
        job = lens.job(job_id)
        if job.document["status"] in ("queued", "running") and not wait_:
            err.print(
                f"job {job_id} is {job.document['status']}; wait for it (lens wait, or --wait)"
            )
            raise typer.Exit(ExitCode.NOT_FINISHED)
        _finish(job, timeout, output or Path(f"{job_id}.safetensors"), as_json)


def jobs(
    status_: Annotated[
        str | None, typer.Option("--status", help="Only jobs with this status.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many.")] = 20,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List your jobs, newest first."""
    with _client(url, api_key) as lens:
        docs = [job.document for job in lens.jobs(status_, limit)]
    if as_json:
        _print_json(docs)
        return
    # ids stay whole (copyable), and the one-word columns unbroken; progress and errors wrap
    table = Table(
        Column("id", no_wrap=True, min_width=32),
        *(Column(name, no_wrap=True) for name in ("kind", "model", "status")),
        "progress",
        Column("created", no_wrap=True),
        Column("took", no_wrap=True),
        "error",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for d in docs:
        error = escape(d["error"]["message"][:60]) if d.get("error") else ""
        table.add_row(d["id"], d["kind"], d["model"], _status(d["status"]), _progress(d),
                      _when(d.get("created_at"), short=True), _duration(d), error)  # fmt: skip
    out.print(table)


def cancel(job_id: JobIdArg, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None,
           as_json: JsonOpt = False) -> None:  # fmt: skip
    """Cancel a job: a queued one never runs, a running one stops at its next step."""
    with _client(url, api_key) as lens:
        job = lens.job(job_id)
        job.cancel()
    if as_json:
        _print_json(job.document)
    else:
        out.print(f"job {job_id}: {_status(job.document['status'])}")


def upload(
    file: Annotated[Path, typer.Argument(help="A .jsonl (prompt/target rows) or .tsv file.")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a prompt/target data set once; jobs name it with --set dataset=ID."""
    if not file.is_file():
        raise typer.BadParameter(f"no such file: {file}", param_hint="FILE")
    with _client(url, api_key) as lens:
        info = lens.upload_dataset(file)
    if as_json:
        _print_json(info)
    else:
        out.print(f"data set {info['id']}: {info['rows']} rows")


def register(app: typer.Typer) -> None:
    """Add the job commands to the ``lens`` app."""
    for command in (models, submit, status, wait, result, jobs, cancel, upload):
        app.command(epilog=EXIT_CODES)(command)
