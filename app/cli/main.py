"""The ``lens`` command: run the service (serve, api, worker, demo) and use it (jobs commands)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from app.cli import jobs

if TYPE_CHECKING:
    from app.core.config import Settings

app = typer.Typer(
    name="lens",
    help="lens-server: interpretability analyses of transformer LMs as a shared service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[
    list[str] | None,
    typer.Option("--model", "-m", help="NAME=PATH_OR_HUB_ID, repeatable."),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML file (models, limits, keys…).")
]
RedisOpt = Annotated[
    str | None, typer.Option("--redis-url", envvar="REDIS_URL", help="Use this Redis.")
]
DataOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Results, data sets, Redis files.")
]
HostOpt = Annotated[str | None, typer.Option("--host", help="Interface to listen on.")]
PortOpt = Annotated[int | None, typer.Option("--port", help="Port to listen on.")]
KeysOpt = Annotated[Path | None, typer.Option("--api-keys", help="File with one API key per line.")]


def load_settings(
    *,
    config: Path | None = None,
    models: list[str] | None = None,
    redis_url: str | None = None,
    data_dir: Path | None = None,
    host: str | None = None,
    port: int | None = None,
    api_keys: Path | None = None,
) -> Settings:
    """Settings from flags over environment over the config file."""
    from app.core.config import CONFIG_ENV, Settings, get_settings, parse_model_arg, read_keys_file

    if config is not None:
        os.environ[CONFIG_ENV] = str(config.resolve())
    get_settings.cache_clear()
    settings = get_settings()
    update: dict[str, object] = {}
    if models:
        update["models"] = {**settings.models, **dict(parse_model_arg(m) for m in models)}
    if redis_url:
        update["redis_url"] = redis_url
    if data_dir:
        update["data_dir"] = data_dir
    if host:
        update["host"] = host
    if port:
        update["port"] = port
    if api_keys:
        update["api_keys"] = read_keys_file(api_keys)
    return Settings.model_validate({**settings.model_dump(), **update}) if update else settings


def _check_exposure(settings: Settings, allow_unauthenticated: bool) -> None:
    """Without keys, refuse to listen beyond localhost unless the operator insists."""
    if settings.key_values() or allow_unauthenticated:
        return
    host = settings.host
    loopback = host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)
    if not loopback:
        raise typer.BadParameter(
            f"no API keys are configured, so the server listens on localhost only; to listen "
            f"on {host}, configure keys (LENS_API_KEYS or --api-keys) or pass "
            "--allow-unauthenticated",
            param_hint="--host",
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _logging(component: str, settings: Settings) -> None:
    """Structured lines (key=value or JSON) on stderr; API keys and the Redis password are
    masked if they appear."""
    from app.core.redis_server import url_secrets
    from app.logs import configure_logging

    configure_logging(
        component,
        fmt=settings.log_format,
        level=settings.log_level,
        secrets=[*settings.key_values(), *url_secrets(settings.redis_url)],
    )


PRIVATE_UMASK = 0o077
"""Files the service makes (blobs, data sets, logs) are its user's alone: other Unix users
on the host are not trusted."""


def _listen(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound before anything starts: a port another server
    holds stops the command with one line, instead of an API that never serves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    return sock


@app.command()
def serve(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    data_dir: DataOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    api_keys: KeysOpt = None,
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes.")] = 1,
    allow_unauthenticated: Annotated[
        bool, typer.Option(help="Listen beyond localhost without API keys.")
    ] = False,
) -> None:
    """All-in-one: its own Redis (unless --redis-url), the API and N workers; Ctrl-C stops all."""
    with _needs_extra("serve"):
        from app.stack import Stack

        settings = load_settings(
            config=config, models=model, redis_url=redis_url, data_dir=data_dir, host=host,
            port=port, api_keys=api_keys,
        )  # fmt: skip
    _check_exposure(settings, allow_unauthenticated)
    if not settings.models:
        raise typer.BadParameter("serve at least one model", param_hint="--model")
    os.umask(PRIVATE_UMASK)
    _listen(settings.host, settings.port).close()
    stack = Stack(settings)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with _children_reported():
        try:
            stack.start(workers=workers, own_redis=redis_url is None)
            typer.echo(f"starting: redis {stack.redis_display}, {workers} worker(s)…")
            _report_failed(stack.wait_ready(timeout=600), settings)
            typer.echo(
                f"lens-server ready at {stack.url} (API docs at {stack.url}/docs); Ctrl-C stops"
            )
            stack.supervise(report=lambda message: typer.echo(message, err=True))
        except KeyboardInterrupt:
            typer.echo("stopping: API, then workers (finishing their jobs), then Redis…")
        finally:
            stack.stop()


def _report_failed(failed: dict[str, str], settings: Settings) -> None:
    """A model that cannot load is reported and the others are served; with none left, the
    service stops (exit 1) with the reason."""
    from app.stack import ChildExited

    lines = [f"model {name} cannot be served: {reason}" for name, reason in sorted(failed.items())]
    if failed and set(failed) >= set(settings.models):
        logs = settings.data_dir / "logs"
        raise ChildExited(f"{'; '.join(lines)} (no model left to serve; the logs: {logs})")
    for line in lines:
        typer.echo(f"warning: {line}", err=True)


@contextmanager
def _needs_extra(extra: str) -> Iterator[None]:
    """The service's commands in a client-only install (``pip install lens-server``): one
    line naming the extra to install, not a traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        typer.echo(
            f"error: this command needs lens-server[{extra}] ({exc.name} is not installed): "
            f"pip install 'lens-server[{extra}]'",
            err=True,
        )
        raise typer.Exit(1) from None


@contextmanager
def _children_reported() -> Iterator[None]:
    """A child process that exits for good, or a service never ready: its reason in a line
    on stderr and exit status 1, not a traceback."""
    from app.stack import ChildExited

    try:
        yield
    except (ChildExited, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def api(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    data_dir: DataOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    api_keys: KeysOpt = None,
    allow_unauthenticated: Annotated[bool, typer.Option()] = False,
) -> None:
    """The HTTP API alone (for compose and multi-host deployments)."""
    with _needs_extra("server"):
        import uvicorn

        from app.main import create_app

        settings = load_settings(
            config=config, models=model, redis_url=redis_url, data_dir=data_dir, host=host,
            port=port, api_keys=api_keys,
        )  # fmt: skip
    _check_exposure(settings, allow_unauthenticated)
    os.umask(PRIVATE_UMASK)
    sock = _listen(settings.host, settings.port)
    _logging("api", settings)
    server_config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_config=None,
        access_log=False, timeout_graceful_shutdown=5,
    )  # fmt: skip
    uvicorn.Server(server_config).run(sockets=[sock])


@app.command()
def worker(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    data_dir: DataOpt = None,
    serves: Annotated[
        list[str] | None, typer.Option("--serve", help="Only these model names (default all).")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="Worker name (default host-pid); it serves the models the config assigns "
            "to this name (a model's 'workers' list), or all unassigned ones."
        ),
    ] = None,
    burst: Annotated[bool, typer.Option(help="Exit when the queues are empty.")] = False,
) -> None:
    """A worker process: loads its models once and runs their jobs (one per GPU or CPU)."""
    # Before torch loads OpenMP: its threads sleep between operations instead of spinning,
    # which on a host shared with the API, Redis and other workers starves them all.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with _needs_extra("worker"):
        from workers.process import run_worker

        settings = load_settings(
            config=config, models=model, redis_url=redis_url, data_dir=data_dir
        )
    os.umask(PRIVATE_UMASK)
    _logging("worker", settings)
    run_worker(settings, serves, name, burst=burst)


@app.command()
def demo(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Where the demo keeps results and logs.")
    ] = Path("data/demo"),
    updates: Annotated[
        int | None,
        typer.Option(min=1, help="Updates per CHG stage (default: the demo's own, 300)."),
    ] = None,
) -> None:
    """Build the demo model, start the service on it, and run score, trace, chg and ablate jobs."""
    from rich.console import Console

    with _needs_extra("serve"):
        from app.cli.demo import run_demo

    with _children_reported():
        run_demo(data_dir, num_updates=updates, console=Console())


jobs.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
