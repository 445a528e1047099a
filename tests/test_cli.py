"""srtrain.cli: the flags, names, the one meaning of a name and the error ladder that
`python -m srtrain.run` and `python -m tune.search` share."""

import os
import re
import subprocess
import sys

import pytest

from srtrain import cli
from srtrain.config import ConfigError, load_config
from srtrain.storage import StorageError


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"run.storage={tmp_path}"])


def test_shared_flags_keep_their_meaning_with_each_commands_help():
    p = cli.parser(
        "x.tool",
        "Do x: `python -m x.tool`.\n\nMore.",
        {
            "--config": "the job",
            "--fast": {"action": "store_true", "help": "go fast"},
            "--set": "an override",
            "--output": "where",
            "--name": "the name",
            "--resume": "continue",
        },
    )
    args = p.parse_args(["--set", "a.b=1", "--set", "c=2", "--output", "s3://b/p", "--resume"])
    assert args.overrides == ["a.b=1", "c=2"] and args.resume and not args.fast
    assert args.config is None and args.name is None
    assert cli.overrides(args) == ["a.b=1", "c=2", 'run.storage="s3://b/p"']
    assert cli.overrides(p.parse_args([])) == []
    # a flag's value stays a string, even where YAML would read a bool or a number
    cfg = load_config(
        None, [cli.as_string("run.name", "true"), cli.as_string("run.storage", "2024")]
    )
    assert cfg.run.name == "true" and cfg.run.storage == "2024"
    text = p.format_help()
    assert text.startswith("usage: python -m x.tool") and "Do x: `python -m x.tool`." in text
    assert "More." not in text and "KEY=VALUE  an override" in text
    # --help lists the flags in the order the command gave them
    assert [text.index(f) for f in ("--config", "--fast", "--set", "--output", "--resume")] == (
        sorted(text.index(f) for f in ("--config", "--fast", "--set", "--output", "--resume"))
    )


def test_names_start_with_the_job():
    assert cli.job_name("jobs/iaprtc12-base.yaml", "samples-base") == "iaprtc12-base"
    assert cli.job_name(None, "tune-samples") == "tune-samples"
    assert re.fullmatch(r"job-\d{8}-\d{6}", cli.new_name("job"))


def test_resume_picks_the_newest_run_of_the_job(cfg, tmp_path):
    for name in ("job-20260101-000000", "job-20260301-000000", "other-20270101-000000"):
        (tmp_path / name).mkdir()
    (tmp_path / "job-20280101-000000").write_text("a file, not a run")
    assert cli.existing_runs(cfg, "job-") == ["job-20260101-000000", "job-20260301-000000"]
    assert cli.choose_name(cfg, None, "job", resume=True) == "job-20260301-000000"
    assert cli.choose_name(cfg, "mine", "job", resume=True) == "mine"
    assert cli.choose_name(cfg, None, "none", resume=True) is None
    new = cli.choose_name(cfg, None, "job", resume=False)
    assert re.fullmatch(r"job-\d{8}-\d{6}", new) and not (tmp_path / new).exists()


def test_a_name_is_new_unless_resume_continues_it(cfg, tmp_path, capsys):
    fresh, taken = str(tmp_path / "fresh"), tmp_path / "taken"
    taken.mkdir()
    assert cli.claim(cfg, "run", "fresh", fresh, resume=False) is False
    assert capsys.readouterr().out == ""
    # --resume of a name that does not exist yet starts it (a Kubernetes retry)
    assert cli.claim(cfg, "search", "fresh", fresh, resume=True) is False
    said = capsys.readouterr().out
    assert said == f"--resume: no search 'fresh' under {tmp_path} yet; starting it\n"
    assert cli.claim(cfg, "run", "taken", str(taken), resume=True) is True
    with pytest.raises(ConfigError) as e:
        cli.claim(cfg, "run", "taken", str(taken), resume=False)
    assert str(e.value) == (
        f"run 'taken' already exists in {tmp_path}: --resume continues it, or choose another --name"
    )


def _raises(error: BaseException):
    def command() -> int:
        raise error

    return command


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (ConfigError("train.epohcs: unknown key"), 2, "p: error: train.epohcs: unknown key"),
        (StorageError("s3://b: no such bucket"), 1, "p: error: s3://b: no such bucket"),
        (cli.Failed("training diverged"), 1, "p: error: training diverged"),
        (cli.Interrupted("continue with --resume"), 130, "p: interrupted; continue with --resume"),
    ],
)
def test_errors_a_user_can_act_on_end_with_one_line_and_their_exit_code(error, code, line, capsys):
    assert cli.exit_code("p", _raises(error)) == code
    out = capsys.readouterr()
    assert out.err == line + "\n" and out.out == ""


def test_a_command_returns_its_own_code_and_bugs_keep_their_traceback(capsys):
    assert cli.exit_code("p", lambda: 0) == 0
    with pytest.raises(KeyError):
        cli.exit_code("p", _raises(KeyError("bug")))
    assert capsys.readouterr().err == ""


# The dashboard port taken between srtrain's check and the dashboard's own bind (as once in CI):
# a real local Ray runtime, in a child process so that this one never initialises Ray.
_TAKEN_PORT = r"""
import os, socket
from srtrain import cli

taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
first = taken.getsockname()[1]
free_port, drawn = cli._free_port, []
def draw():
    drawn.append(first if not drawn else free_port())
    return drawn[-1]
cli._free_port = draw

cli.start_ray(own_dashboard=True)
import ray

@ray.remote
def answer():
    return 42

names = [open(f"/proc/{p}/cmdline").read().split("\0")[0] for p in cli._children()]
print("ports", *drawn, "api", os.environ["RAY_API_SERVER_ADDRESS"])
gcs = sum(n.endswith("gcs_server") for n in names)
print("gcs servers", gcs, "answer", ray.get(answer.remote()))
ray.shutdown()
"""


def test_a_dashboard_port_taken_meanwhile_gets_another_and_the_half_started_runtime_stops():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API"))}
    p = subprocess.run(
        [sys.executable, "-c", _TAKEN_PORT], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    first, second = re.search(r"^ports (\d+) (\d+) api (\S+)$", p.stdout, re.M).groups()[:2]
    assert first != second
    assert f"Ray dashboard port {first} was taken meanwhile; trying another" in p.stdout
    assert f"api http://127.0.0.1:{second}" in p.stdout
    # the first attempt's GCS was stopped: one runtime, and it works
    assert "gcs servers 1 answer 42" in p.stdout, p.stdout
