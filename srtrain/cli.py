"""What `python -m srtrain.run` and `python -m tune.search` share as commands.

Both take a job (`--config`, `--set`), an output (`--output`, local or s3://) and a name under it
(`--name`, default `<job>-<UTC time>`; `--resume` continues it). A name means one run or one
search: an existing one is an error unless `--resume` continues it, and `--resume` of a name that
does not exist yet starts it (a Kubernetes retry of a job that failed before it wrote anything).
Errors a user can act on end a command with one line, `<prog>: error: ...`: exit 2 for a bad job,
flag or name (ConfigError), 1 for storage and failed runs; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from srtrain import storage
from srtrain.config import Config, ConfigError

# The flags both commands take; each command says in its own words what they mean for it.
SHARED_FLAGS = {
    "--config": {},
    "--set": {"dest": "overrides", "action": "append", "default": [], "metavar": "KEY=VALUE"},
    "--output": {},
    "--name": {},
    "--resume": {"action": "store_true"},
}


def parser(prog: str, doc: str, flags: dict[str, str | dict]) -> argparse.ArgumentParser:
    """`python -m prog`'s parser, described by the first line of its docstring. `flags` maps each
    flag, in --help order, to its help text (a flag of SHARED_FLAGS) or to its add_argument
    keywords (a command's own flag)."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.partition("\n")[0])
    for flag, spec in flags.items():
        p.add_argument(
            flag, **({**SHARED_FLAGS[flag], "help": spec} if isinstance(spec, str) else spec)
        )
    return p


def overrides(args: argparse.Namespace) -> list[str]:
    """The job's --set overrides, then --output as run.storage."""
    return [*args.overrides, *([as_string("run.storage", args.output)] if args.output else [])]


def as_string(key: str, value: str) -> str:
    """An override that keeps a flag's value a string: `--name 2024` or `--name true` names a
    run rather than failing as an int or a bool (a JSON string is a YAML string)."""
    return f"{key}={json.dumps(value)}"


def absolute(uri: str) -> str:
    """A local path made absolute (Ray's workers run in other working directories); s3:// as is."""
    return uri if storage.is_s3(uri) else str(Path(uri).expanduser().resolve())


# --- names --------------------------------------------------------------------------------------


def job_name(config: str | None, default: str) -> str:
    """The job a name starts with: the --config file's stem, or the embedded job's name."""
    return Path(config).stem if config else default


def new_name(job: str) -> str:
    return f"{job}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def existing_runs(cfg: Config, prefix: str) -> list[str]:
    """The directories under run.storage whose names start with `prefix`, oldest name first."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(cfg.run.storage, cfg.data.endpoint_url, cfg.data.region)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as e:
        raise storage.StorageError(f"{cfg.run.storage}: cannot list runs ({e})") from None
    return sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)
    )


def choose_name(cfg: Config, given: str | None, job: str, resume: bool) -> str | None:
    """The name to use: `given`; else with --resume the newest `<job>-<UTC time>` under
    run.storage (None when there is none); else a new one."""
    if given:
        return given
    if resume:
        found = existing_runs(cfg, f"{job}-")
        return found[-1] if found else None
    return new_name(job)


def claim(cfg: Config, kind: str, name: str, directory: str, resume: bool) -> bool:
    """The one meaning of a name (`kind` "run" or "search"): without --resume it must be new;
    --resume continues it, or starts it if it does not exist yet. Returns whether it exists."""
    if not storage.exists(directory, cfg.data.endpoint_url, cfg.data.region):
        if resume:
            print(
                f"--resume: no {kind} {name!r} under {cfg.run.storage} yet; starting it", flush=True
            )
        return False
    if not resume:
        raise ConfigError(
            f"{kind} {name!r} already exists in {cfg.run.storage}: --resume continues it, "
            "or choose another --name"
        )
    return True


# --- Ray ----------------------------------------------------------------------------------------


def start_ray(own_dashboard: bool = False) -> None:
    """Joins the cluster in RAY_ADDRESS (ray job submit sets it) or starts a local runtime.

    A trial ASHA stops dies without shutting its Train run down; Ray Train's placement group
    cleaner then frees the workers' resources, looking the cluster up through the dashboard's
    state API. Auto-detection fails when a machine runs several local Ray runtimes (parallel test
    sessions), leaking the CPUs of every stopped trial, so with `own_dashboard` (tune.search) a
    local runtime gets a dashboard on a port of our choosing and its processes inherit
    RAY_API_SERVER_ADDRESS naming it.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address or not own_dashboard:
        ray.init(address=address or None, configure_logging=False)
        return
    for attempt in range(1, DASHBOARD_ATTEMPTS + 1):
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        before = _children()
        try:
            ray.init(
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                configure_logging=False,
            )
            return
        except ValueError as e:
            # Another process bound the port between our check and the dashboard's. Ray has
            # started its GCS and monitor by then and gives up without stopping them.
            if "already occupied" not in str(e) or attempt == DASHBOARD_ATTEMPTS:
                raise
            _stop(_children() - before)
            print(f"Ray dashboard port {port} was taken meanwhile; trying another", flush=True)


DASHBOARD_ATTEMPTS = 3


def _free_port() -> int:
    """A free port for the dashboard, below the kernel's ephemeral range (32768 up) and above Ray's
    worker ports (10002-19999): a port the kernel handed out (bind to 0) could be handed to one
    of Ray's own sockets before the dashboard binds it (seen once in CI). Another process can
    still take it before the dashboard binds it: `start_ray` then tries another."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _children() -> set[int]:
    """The pids of this process's children (Linux /proc; elsewhere none are known)."""
    me, out = os.getpid(), set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # the field after the state: ppid
            out.add(int(entry))
    return out


def _stop(pids: set[int], grace: float = 5.0) -> None:
    """SIGTERM to `pids` (children of this process), SIGKILL to any left after `grace` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            for pid in list(pids):
                try:
                    done = os.waitpid(pid, os.WNOHANG)[0] == pid
                except ChildProcessError:  # reaped elsewhere (subprocess's own clean-up)
                    done = True
                if done:
                    pids.discard(pid)
            time.sleep(0.05)
        if not pids:
            return


# --- errors -------------------------------------------------------------------------------------


class Failed(Exception):
    """A command ended without a result, for a reason the user can act on: `prog: error: ...`,
    exit 1 (the job was valid, the run or its storage was not)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: `prog: interrupted; <how to continue>`, exit 130."""


def exit_code(prog: str, command: Callable[[], int]) -> int:
    """Runs a command and turns what the user can act on into one line on stderr and the exit
    code: ConfigError 2, StorageError and Failed 1, Interrupted 130. Other errors are bugs and
    keep their traceback."""
    try:
        return command()
    except ConfigError as e:
        line, code = f"error: {e}", 2
    except (storage.StorageError, Failed) as e:
        line, code = f"error: {e}", 1
    except Interrupted as e:
        line, code = f"interrupted; {e}", 130
    print(f"{prog}: {line}", file=sys.stderr)
    return code
