"""The readme agent on repositories made here: its steps, its exact findings, cloning, refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.agent.base import Conversation
from app.agent.readme import MAX_CHECKS, NO_REPOSITORY, ReadmeAgent, make_sample_repository

from .servers import ROOT, free_port, wait_until

HELLO = {"id": 0, "type": "user_message", "content": "check whether there is any incorrect information in the README"}

README = """\
# Demo

See [the guide](docs/guide.md) and [its install part](docs/guide.md#install-1).
The [setup](docs/setup.md) and [missing part](docs/guide.md#usage) are wrong.
![logo](img/logo.png) ![gone](img/gone.png "title") [site](https://example.com/x.md) [mail](mailto:a@b.c)
Jump to [Usage](#usage) or [Nowhere](#nowhere); [up](../other/README.md); [out](link_out/secret.md).
Run `python3 run.py` or `python3 start.py`; the code is in `src/app/main.py` and `src/app/`; `main.py` too.
Not paths: `owner/name`, `Node.js`, `--flag`, `*.py`, `$HOME/x.py`, `http://example.com/a.py`, `[link](gone.md)`.
Missing: `config/settings.yaml`, `docs/` is fine, `run.py/` is a file, `src/app/main.py:12` exists.
<img src="img/missing.svg"> <a href="docs/guide.md">guide</a>

## Usage

```bash
python3 run.py --port 8000
bash scripts/x.sh && ./tool --help
./build.sh
./missing-tool
cd sub && python3 y.py && python3 z.py
FOO=1 python -m http.server  # modules are not checked
sh "$SCRIPT"
```

```console
$ git clone https://example.com/demo.git
$ cd demo
$ python3 run.py > out.txt 2>&1
output that mentions python3 gone.py is no command
```

```python
open("not/checked.py")
```

[ref]: docs/nothing.md
[ok]: run.py
"""
FINDINGS = [
    "line 4: link `docs/setup.md` points to a file that does not exist",
    "line 4: link `docs/guide.md#usage` points to a section that does not exist",
    "line 5: link `img/gone.png` points to a file that does not exist",
    "line 6: link `#nowhere` points to a section that does not exist",
    "line 6: link `../other/README.md` points outside the repository",
    "line 6: link `link_out/secret.md` points outside the repository",
    "line 7: `python3 start.py` runs `start.py`, which does not exist",
    "line 9: `config/settings.yaml` is mentioned but does not exist",
    "line 9: `run.py/` is mentioned as a folder but is a file",
    "line 10: link `img/missing.svg` points to a file that does not exist",
    "line 17: `./build.sh` is not executable",
    "line 18: `./missing-tool` does not exist",
    "line 19: `python3 z.py` runs `sub/z.py`, which does not exist",
    "line 35: link `docs/nothing.md` points to a file that does not exist",
]


def write(root: Path, files: dict[str, str], executable: tuple[str, ...] = ()) -> None:
    """Write `files` under `root`, the `executable` ones with mode 755."""
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    for rel in executable:
        (root / rel).chmod(0o755)


def demo(workspace: Path) -> Path:
    """The repository octo/demo, whose README is README above; a secret sits beside it, outside."""
    root = workspace / "octo" / "demo"
    write(root, {"README.md": README, "run.py": "", "tool": "", "build.sh": "", "scripts/x.sh": "",
                 "docs/guide.md": "# Guide\n\n## Install\n\n## Install\n", "src/app/main.py": "", "sub/y.py": "",
                 "img/logo.png": ""}, executable=("tool", "scripts/x.sh"))
    write(workspace / "outside", {"secret.md": "TOPSECRET"})
    os.symlink(workspace / "outside", root / "link_out")
    return root


def run(workspace: Path, repository: str | None, branch: str | None = None,
        **settings: Any) -> list[dict[str, Any]]:
    """Every event of one readme run on `repository`."""
    agent = ReadmeAgent({"AGENT_WORKSPACE": str(workspace), "AGENT_GIT_BASE_URL": "", **settings})
    return list(agent.run(Conversation("c1", repository, branch, None), [HELLO], HELLO))


def findings(events: list[dict[str, Any]]) -> list[str]:
    """The problems the closing message lists."""
    assert events[-1]["type"] == "agent_message"
    return [line[2:] for line in events[-1]["content"].splitlines() if line.startswith("- ")]


def steps(events: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(action, args) of each agent_action, checking that an observation of it comes right after."""
    pairs = []
    for event, after in zip(events, events[1:]):
        if event["type"] == "agent_action":
            assert after["type"] == "observation" and after["observation"] == event["action"]
            pairs.append((event["action"], event["args"]))
    return pairs


def test_finds_each_broken_link_path_and_command_with_its_line(tmp_path: Path) -> None:
    demo(tmp_path)
    events = run(tmp_path, "octo/demo")
    assert findings(events) == FINDINGS
    assert events[-1]["content"].startswith(
        "I read README.md of octo/demo and checked 13 links, 6 paths and 9 commands. 14 things look wrong:")
    done = steps(events)
    assert done[:2] == [("read", {"path": "README.md"}), ("list", {"path": "."})]
    assert events[1]["content"] == README
    assert "docs/guide.md\n" in events[3]["content"] and events[3]["content"].startswith("9 files and 7 folders")
    checks = [args for action, args in done[2:]]
    assert all(action == "check" for action, _ in done[2:]) and len(checks) == 28
    assert {"kind": "link", "target": "docs/guide.md", "lines": [3, 10]} in checks
    assert {"kind": "command", "target": "python3 run.py", "lines": [7, 27]} in checks
    assert {"kind": "path", "target": "main.py", "lines": [7]} in checks  # found under src/app: fine
    assert "TOPSECRET" not in json.dumps(events)  # the link out was never followed
    assert run(tmp_path, "octo/demo") == events  # the same repository, the same steps


def test_a_readme_with_nothing_wrong(tmp_path: Path) -> None:
    write(tmp_path / "a" / "b", {"README.md": "# B\n\nSee [docs](docs/) and `main.py`.\n", "docs/x.md": "",
                                 "main.py": ""})
    events = run(tmp_path, "a/b")
    assert events[-1]["content"] == ("I read README.md of a/b and checked 1 link, 1 path and 0 commands: nothing "
                                     "is wrong, each one points to something that exists.")


def test_what_gitignore_covers_and_layout_trees_are_not_flagged(tmp_path: Path) -> None:
    readme = ("Run `python3 app.py`; it writes `build/out.txt` and `logs/`.\n\n```\nsrc/          the code\n"
              "tools/run     a tool\n```\n\n```sh\n./build/app\n./dist/missing\n```\n\n[built](build/index.html)\n")
    write(tmp_path / "a" / "b", {"README.md": readme, ".gitignore": "# made by the build\nbuild/\n/logs\n!keep\n",
                                 "app.py": "", "src/x.py": ""})
    assert findings(run(tmp_path, "a/b")) == [
        "line 10: `./dist/missing` does not exist",
        "line 13: link `build/index.html` points to a file that does not exist",  # a link must work on the forge
    ]


def test_checks_are_capped(tmp_path: Path) -> None:
    links = "".join(f"[x](missing{i:03d}.md)\n" for i in range(MAX_CHECKS + 50))
    write(tmp_path / "a" / "b", {"README.md": links})
    events = run(tmp_path, "a/b")
    assert sum(e["type"] == "agent_action" and e["action"] == "check" for e in events) == MAX_CHECKS
    assert len(findings(events)) == MAX_CHECKS
    assert events[-1]["content"].endswith(f"I stopped after {MAX_CHECKS} checks: 50 more were not made.")


def test_the_sample_repository(tmp_path: Path) -> None:
    assert make_sample_repository(tmp_path) == "sample/hello"
    assert make_sample_repository(tmp_path) == "sample/hello"  # again: the same files
    assert os.access(tmp_path / "sample" / "hello" / "scripts" / "test.sh", os.X_OK)
    events = run(tmp_path, "sample/hello")
    assert findings(events) == [
        "line 10: `python3 greet.py` runs `greet.py`, which does not exist",
        "line 14: link `docs/setup.md` points to a file that does not exist",
        "line 18: link `#configuration` points to a section that does not exist",
    ]
    hello = subprocess.run([sys.executable, "hello.py", "--name", "you"], cwd=tmp_path / "sample" / "hello",
                           capture_output=True, text=True, timeout=30)
    assert hello.stdout == "Hello, you!\n"  # what its README says works does


def test_a_conversation_without_repository(tmp_path: Path) -> None:
    assert run(tmp_path, None) == [{"type": "agent_message", "content": NO_REPOSITORY}]
    assert "`repository: owner/name`" in NO_REPOSITORY


def test_a_missing_repository_and_no_clone(tmp_path: Path) -> None:
    assert run(tmp_path, "octo/nope") == [{"type": "agent_message", "content": (
        "I could not find the repository octo/nope: there is no folder octo/nope in the agent workspace "
        "(AGENT_WORKSPACE), and cloning is off (AGENT_GIT_BASE_URL is empty).")}]


def test_a_repository_without_readme(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert run(tmp_path, "a/b") == [
        {"type": "agent_action", "action": "read", "args": {"path": "README.md"}},
        {"type": "observation", "observation": "read", "content": "README.md: no such file"},
        {"type": "agent_message", "content": "a/b has no README.md, so there is nothing to check."},
    ]


@pytest.mark.parametrize("repository", ["../etc", "a/..", "./a", "a/b/c", "/etc/passwd", "a/b\n"])
def test_repository_names_that_escape_are_refused(tmp_path: Path, repository: str) -> None:
    (events,) = run(tmp_path, repository, AGENT_GIT_BASE_URL=str(tmp_path))
    assert events["type"] == "agent_message" and "is not a repository I can use" in events["content"]


def test_symbolic_links_out_of_the_workspace_are_refused(tmp_path: Path) -> None:
    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    write(outside / "repo", {"README.md": "TOPSECRET"})
    (workspace / "octo").mkdir(parents=True)
    os.symlink(outside / "repo", workspace / "octo" / "linked")
    os.symlink(outside, workspace / "evil")
    for repository in ("octo/linked", "evil/repo"):
        assert run(workspace, repository) == [{"type": "agent_message", "content": (
            f"The folder of {repository} leads outside the agent workspace; I will not read it.")}]
    (workspace / "octo" / "readme").mkdir()
    os.symlink(outside / "repo" / "README.md", workspace / "octo" / "readme" / "README.md")
    events = run(workspace, "octo/readme")
    assert events[-1] == {"type": "agent_message", "content": (
        "README.md of octo/readme is a link to outside the repository; I will not read it.")}
    assert "TOPSECRET" not in json.dumps(events)


def git(*args: str, cwd: Path) -> None:
    """Run git for a test's setup, away from the machine's git configuration."""
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=30)


@pytest.fixture()
def remote(tmp_path: Path) -> Path:
    """A base folder holding the bare repository octo/cat: branch main (a broken link) and dev (none)."""
    work, base = tmp_path / "work", tmp_path / "base"
    write(work, {"README.md": "# Cat\n\nSee [the docs](docs/cat.md).\n"})
    git("init", "-q", "-b", "main", cwd=work)
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "main", cwd=work)
    git("checkout", "-q", "-b", "dev", cwd=work)
    write(work, {"README.md": "# Cat, dev\n\nSee [the docs](docs/cat.md).\n", "docs/cat.md": ""})
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "dev", cwd=work)
    (base / "octo" / "cat").mkdir(parents=True)
    git("init", "-q", "--bare", cwd=base / "octo" / "cat")
    git("push", "-q", str(base / "octo" / "cat"), "main", "dev", cwd=work)
    git("symbolic-ref", "HEAD", "refs/heads/main", cwd=base / "octo" / "cat")
    return base


def leftovers(workspace: Path) -> list[str]:
    """Half-made clones left in the workspace."""
    return [p.name for p in workspace.rglob(".*.clone-*")]


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_a_missing_repository_is_cloned(tmp_path: Path, remote: Path, form: str) -> None:
    workspace = tmp_path / "ws"
    base = str(remote) if form == "path" else remote.as_uri()
    events = run(workspace, "octo/cat", AGENT_GIT_BASE_URL=base)
    assert events[:2] == [{"type": "agent_action", "action": "clone", "args": {"repository": "octo/cat"}},
                          {"type": "observation", "observation": "clone", "content": "cloned octo/cat"}]
    assert findings(events) == ["line 3: link `docs/cat.md` points to a file that does not exist"]
    assert (workspace / "octo" / "cat" / "README.md").is_file() and not leftovers(workspace)
    again = run(workspace, "octo/cat", AGENT_GIT_BASE_URL=base)
    assert again[1] == {"type": "observation", "observation": "clone",
                        "content": "octo/cat is already in the workspace: not cloned again"}
    assert [e.get("action") for e in again] == [e.get("action") for e in events]  # the same steps
    assert again[2:] == events[2:]


def test_the_selected_branch_is_cloned(tmp_path: Path, remote: Path) -> None:
    events = run(tmp_path / "ws", "octo/cat", "dev", AGENT_GIT_BASE_URL=remote.as_uri())
    assert events[:2] == [
        {"type": "agent_action", "action": "clone", "args": {"repository": "octo/cat", "branch": "dev"}},
        {"type": "observation", "observation": "clone", "content": "cloned octo/cat (branch dev)"}]
    assert events[3]["content"].startswith("# Cat, dev") and findings(events) == []


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_a_repository_missing_on_the_git_server(tmp_path: Path, remote: Path, form: str) -> None:
    workspace = tmp_path / "ws"
    base = str(remote) if form == "path" else remote.as_uri()
    events = run(workspace, "octo/nope", AGENT_GIT_BASE_URL=base)
    assert [e["type"] for e in events] == ["agent_action", "observation", "agent_message"]
    assert events[2]["content"].startswith("I could not clone octo/nope: ")
    assert "'octo/nope'" in events[2]["content"]
    assert str(remote) not in json.dumps(events) and str(workspace) not in json.dumps(events)
    assert not (workspace / "octo" / "nope").exists() and not leftovers(workspace)


def test_a_branch_missing_on_the_git_server(tmp_path: Path, remote: Path) -> None:
    events = run(tmp_path / "ws", "octo/cat", "--nope", AGENT_GIT_BASE_URL=remote.as_uri())
    assert events[-1] == {"type": "agent_message", "content": (
        "I could not clone octo/cat (branch --nope): Remote branch --nope not found in upstream origin.")}


def test_credentials_in_the_git_url_are_never_shown(tmp_path: Path) -> None:
    base = f"http://robot:s3cr3t-token@127.0.0.1:{free_port()}"  # nobody listens: git fails at once
    events = run(tmp_path / "ws", "octo/cat", AGENT_GIT_BASE_URL=base)
    assert events[-1]["content"].startswith("I could not clone octo/cat: ")
    assert "s3cr3t" not in json.dumps(events) and "robot" not in json.dumps(events)


FAKE_GIT = """#!/bin/sh
# a git that hangs, with a helper process of its own, after making the folder it clones into
for last; do :; done
mkdir -p "$last"
sleep 30 &
echo "$$ $!" > "$HOME/pids.tmp" && mv "$HOME/pids.tmp" "$HOME/pids"
wait
"""


def gone(pid: int) -> bool:
    """Whether the process has ended (a zombie no one has reaped yet counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture()
def hanging_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH starts with a git that never ends; returns the file where it writes its pids."""
    write(tmp_path / "bin", {"git": FAKE_GIT}, executable=("git",))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    # (the clone keeps only git's own environment: the fake git learns where to write from HOME)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path / "pids"


def test_a_clone_that_takes_too_long_is_killed(tmp_path: Path, hanging_git: Path) -> None:
    workspace = tmp_path / "ws"
    events = run(workspace, "octo/cat", AGENT_GIT_BASE_URL="file:///nowhere", AGENT_GIT_TIMEOUT_SECONDS=0.5)
    assert events[-1] == {"type": "agent_message",
                          "content": "I could not clone octo/cat: git clone took longer than 0.5 seconds."}
    for pid in map(int, hanging_git.read_text().split()):
        wait_until(lambda pid=pid: gone(pid), 10, what=f"process {pid} to end")
    assert not leftovers(workspace) and not (workspace / "octo" / "cat").exists()


GEVENT_CANCEL = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import json, os, sys, gevent
    from app.agent.base import Conversation
    from app.agent.readme import ReadmeAgent

    agent = ReadmeAgent({"AGENT_WORKSPACE": sys.argv[1], "AGENT_GIT_BASE_URL": "file:///nowhere"})
    hello = {"id": 0, "type": "user_message", "content": "check"}
    events = []
    run = gevent.spawn(lambda: events.extend(agent.run(Conversation("c", "octo/cat", None, None), [hello], hello)))
    with gevent.Timeout(20):
        while not os.path.exists(os.path.join(os.environ["HOME"], "pids")):
            gevent.sleep(0.01)  # the loop turns meanwhile: git is waited on cooperatively
    run.kill(timeout=5)  # the stop button: GreenletExit in the middle of the clone
    print(json.dumps({"dead": run.dead, "killed": type(run.value).__name__}))
""")


def test_a_cancelled_clone_kills_git_in_a_patched_worker(tmp_path: Path, hanging_git: Path) -> None:
    workspace = tmp_path / "ws"
    done = subprocess.run([sys.executable, "-c", GEVENT_CANCEL, str(workspace)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"dead": True, "killed": "GreenletExit"}
    for pid in map(int, hanging_git.read_text().split()):
        wait_until(lambda pid=pid: gone(pid), 10, what=f"process {pid} to end")
    assert not leftovers(workspace) and not (workspace / "octo" / "cat").exists()


def test_git_sees_none_of_the_workers_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "bin", {"git": '#!/bin/sh\nenv > "$HOME/git-env"\nexit 1\n'}, executable=("git",))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("AGENT_LLM_API_KEY", "SECRET_KEY", "REDIS_URL"):
        monkeypatch.setenv(name, "s3cret-value")
    run(tmp_path / "ws", "octo/cat", AGENT_GIT_BASE_URL="file:///nowhere")
    seen = (tmp_path / "git-env").read_text()
    assert "s3cret-value" not in seen and "GIT_TERMINAL_PROMPT=0" in seen
