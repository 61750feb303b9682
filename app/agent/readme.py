"""The readme agent: finds what a repository's README.md points at that does not exist."""
from __future__ import annotations

import os
import posixpath
import re
import shutil
import signal
import subprocess  # gevent's, in the monkey-patched worker: waiting on git yields to other runs
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .base import Agent, Conversation
from .readme_scan import Ref, anchors, ignore_patterns, ignored, scan

MAX_CHECKS = 200  # distinct things checked per run; the rest are counted, not checked
MAX_README_BYTES = 512 * 1024
MAX_DOC_BYTES = 256 * 1024  # another markdown file, read for its headings
MAX_TREE_ENTRIES = 20_000
MAX_LISTED = 200  # entries shown in the list observation
MAX_OBSERVATION_CHARS = 16_000
GIT_TIMEOUT_SECONDS = 120.0
README_NAMES = ("readme.md", "readme.markdown", "readme")
REPOSITORY = re.compile(r"[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}")
USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")

NO_REPOSITORY = (
    "This conversation has no repository, so there is no README.md to check. Create the conversation "
    "with `repository: owner/name` (POST /api/conversations with {\"repository\": \"owner/name\"})."
)
PROBLEMS = {
    ("link", "outside"): "link `{shown}` points outside the repository",
    ("link", "missing"): "link `{shown}` points to a file that does not exist",
    ("link", "no_section"): "link `{shown}` points to a section that does not exist",
    ("path", "outside"): "`{shown}` points outside the repository",
    ("path", "missing"): "`{shown}` is mentioned but does not exist",
    ("path", "not_dir"): "`{shown}` is mentioned as a folder but is a file",
    ("command", "outside"): "`{shown}` runs `{path}`, which is outside the repository",
    ("command", "missing"): "`{shown}` runs `{path}`, which does not exist",
    ("command", "is_dir"): "`{shown}` runs `{path}`, which is a folder",
    ("command", "not_exec"): "`{shown}` runs `{path}`, which is not executable",
    ("program", "outside"): "`{shown}` is outside the repository",  # a command that is the file itself
    ("program", "missing"): "`{shown}` does not exist",
    ("program", "is_dir"): "`{shown}` is a folder",
    ("program", "not_exec"): "`{shown}` is not executable",
}


# What a clone keeps of the worker's environment: where git and ssh are, their own settings, proxies.
GIT_ENVIRONMENT = ("PATH", "HOME", "USER", "TMPDIR", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_CONFIG_GLOBAL",
                   "GIT_CONFIG_NOSYSTEM", "SSH_AUTH_SOCK", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
                   "https_proxy", "no_proxy", "GIT_SSL_CAINFO", "SSL_CERT_FILE", "SSL_CERT_DIR")

def message(content: str) -> dict[str, Any]:
    """An agent_message event."""
    return {"type": "agent_message", "content": content}


def plural(count: int, word: str) -> str:
    """'1 link', '3 links'."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def inside(root: str, real: str) -> bool:
    """Whether the resolved path `real` is `root` or under it."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def locate(root: str, cwd: str, rel: str) -> str | None:
    """The repository-relative path `rel` names from `cwd`, or None when it leads out of the repository."""
    joined = posixpath.normpath(posixpath.join(cwd, rel.lstrip("/")))  # a leading / is the repository's root
    if joined == ".." or joined.startswith("../"):
        return None
    # realpath follows symbolic links, so one that leads out is caught here, before anything is read
    if not inside(root, os.path.realpath(os.path.join(root, joined))):
        return None
    return "" if joined == "." else joined


def read_bounded(path: str, limit: int) -> tuple[str, bool]:
    """The file's text (UTF-8, bad bytes replaced), at most `limit` bytes of it, and whether it was cut."""
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def clip(text: str, limit: int = MAX_OBSERVATION_CHARS) -> str:
    """`text`, cut to `limit` characters with a note saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}\n… ({len(text) - limit} more characters)"


def walk(root: str) -> tuple[list[str], bool]:
    """Every path under `root` (folders end with /), sorted, without .git, and whether the cap cut it."""
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):  # symbolic links are listed, never followed
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        entries.extend(prefix + d + "/" for d in dirnames)
        entries.extend(prefix + f for f in sorted(filenames))
        if len(entries) >= MAX_TREE_ENTRIES:
            return sorted(entries[:MAX_TREE_ENTRIES]), True
        time.sleep(0)  # a big tree must not hold the worker's other runs (gevent: sleep(0) yields)
    return sorted(entries), False


def git_error(stderr: bytes, replacements: Mapping[str, str]) -> str:
    """What git said went wrong, with the URL, our paths and any credentials taken out."""
    text = stderr.decode("utf-8", errors="replace")
    for old, new in replacements.items():
        text = text.replace(old, new)
    text = USERINFO.sub(r"\1***@", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    wanted = [line for line in lines if line.startswith(("fatal:", "error:", "remote:"))] or lines[-3:]
    reason = "; ".join(line.removeprefix("fatal: ").removeprefix("error: ") for line in wanted)
    return reason[:400] or "git gave no reason"


def git_clone(base: str, repository: str, branch: str | None, dest: str, timeout: float) -> str | None:
    """Clone `<base>/<repository>` into `dest`: None when it worked, else a safe account of why not."""
    url = f"{base.rstrip('/')}/{repository}"
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    # into a hidden folder first, moved into place when complete: a cancelled clone never looks like a repository
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.clone-{uuid.uuid4().hex[:12]}")
    args = ["git", "clone", "--depth", "1", "--quiet"]
    if branch:
        args.append(f"--branch={branch}")  # one argument: a branch named like an option stays a branch
    args += ["--", url, tmp]
    # Only what git needs: the worker's environment holds secrets (the LLM key, Redis password,
    # SECRET_KEY) that a git helper or a hostile server-side hook output must never see.
    env = {name: os.environ[name] for name in GIT_ENVIRONMENT if name in os.environ}
    env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    if "GIT_SSH" not in env and "GIT_SSH_COMMAND" not in env:
        env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"  # ssh must not ask for a password either
    proc = None
    try:
        try:
            # a session of its own: no terminal to prompt on, and its helpers die with it (killpg)
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError:
            return "git cannot be started on the agent's host"
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"git clone took longer than {timeout:g} seconds"
        if proc.returncode != 0:
            # git names a file:// remote by its path alone: that is taken out too
            local = urlsplit(url).path if url.startswith("file://") else url
            return git_error(stderr, {url: repository, local: repository, tmp: repository, base: "the git server"})
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):  # else another run cloned it meanwhile: use theirs
                return "the clone could not be moved into the workspace"
        return None
    finally:
        if proc is not None and proc.poll() is None:  # timed out or cancelled (GreenletExit): end git now
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()  # communicate() leaves it open when it timed out or was cut
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Check:
    """One thing looked at: a link, path or command, with the README lines that mention it."""

    ref: Ref
    lines: list[int] = field(default_factory=list)


@dataclass
class Tree:
    """What the checks know of the repository beyond its files: names anywhere, ignored paths, sections."""

    tails: set[str]  # each path and each of its tails (agent/base.py of app/agent/base.py)
    ignored: list[str]  # the root .gitignore's patterns
    headings: dict[str, set[str]] = field(default_factory=dict)  # a markdown file's anchors, once read


class ReadmeAgent(Agent):
    """Reads the conversation repository's README.md and checks its links, paths and commands."""

    name = "readme"
    history_events = 1  # it checks the repository, whatever was said before

    def run(self, conversation: Conversation, history: list[dict[str, Any]],
            action: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield the steps of checking the README, then one message with what is wrong."""
        repository = conversation.repository
        if not repository:
            yield message(NO_REPOSITORY)
            return
        if not REPOSITORY.fullmatch(repository) or any(p in (".", "..") for p in repository.split("/")):
            yield message(f"`{repository[:200]}` is not a repository I can use: it must be owner/name, "
                          "without `.` or `..` parts.")
            return
        workspace = os.path.realpath(self.settings.get("AGENT_WORKSPACE") or "var/workspace")
        dest = os.path.join(workspace, *repository.split("/"))
        if not inside(workspace, os.path.realpath(dest)):
            yield message(f"The folder of {repository} leads outside the agent workspace; I will not read it.")
            return
        base = self.settings.get("AGENT_GIT_BASE_URL") or ""
        if not base and not os.path.lexists(dest):
            yield message(f"I could not find the repository {repository}: there is no folder {repository} in "
                          "the agent workspace (AGENT_WORKSPACE), and cloning is off (AGENT_GIT_BASE_URL is empty).")
            return
        if base:
            # the clone step is there whenever cloning is on, cloned or not: a run cut off after the clone and
            # run again has the same steps at the same positions (the runtime skips the ones already written)
            branch = conversation.selected_branch
            on = f" (branch {branch})" if branch else ""
            yield {"type": "agent_action", "action": "clone",
                   "args": {"repository": repository, **({"branch": branch} if branch else {})}}
            if os.path.lexists(dest):
                yield {"type": "observation", "observation": "clone",
                       "content": f"{repository} is already in the workspace: not cloned again"}
            else:
                timeout = float(self.settings.get("AGENT_GIT_TIMEOUT_SECONDS") or GIT_TIMEOUT_SECONDS)
                failure = git_clone(base, repository, branch, dest, timeout)
                yield {"type": "observation", "observation": "clone",
                       "content": f"git clone failed: {failure}" if failure else f"cloned {repository}{on}"}
                if failure:
                    yield message(f"I could not clone {repository}{on}: {failure.rstrip('.')}.")
                    return
        root = os.path.realpath(dest)
        if not inside(workspace, root) or not os.path.isdir(root):
            yield message(f"{repository} in the agent workspace is not a folder I can read.")
            return
        yield from self.check_readme(repository, root)

    def check_readme(self, repository: str, root: str) -> Iterator[dict[str, Any]]:
        """Read the README, list the tree, check each reference, and say what is wrong."""
        top = sorted(os.listdir(root))
        name = "README.md" if "README.md" in top else next(
            (n for n in top if n.lower() in README_NAMES and os.path.isfile(os.path.join(root, n))), "README.md")
        yield {"type": "agent_action", "action": "read", "args": {"path": name}}
        rel = locate(root, "", name)
        if rel is None:
            yield {"type": "observation", "observation": "read",
                   "content": f"{name} is a link to outside the repository: not read"}
            yield message(f"{name} of {repository} is a link to outside the repository; I will not read it.")
            return
        if not os.path.isfile(os.path.join(root, rel)):
            yield {"type": "observation", "observation": "read", "content": f"{name}: no such file"}
            yield message(f"{repository} has no {name}, so there is nothing to check.")
            return
        text, cut = read_bounded(os.path.join(root, rel), MAX_README_BYTES)
        yield {"type": "observation", "observation": "read", "content": clip(text)}

        yield {"type": "agent_action", "action": "list", "args": {"path": "."}}
        entries, capped = walk(root)
        folders = sum(e.endswith("/") for e in entries)
        listing = "\n".join(entries[:MAX_LISTED]) + (f"\n… and {len(entries) - MAX_LISTED} more"
                                                    if len(entries) > MAX_LISTED else "")
        yield {"type": "observation", "observation": "list",
               "content": f"{plural(len(entries) - folders, 'file')} and {plural(folders, 'folder')}"
                          f"{' (stopped counting there)' if capped else ''}:\n{listing}"}

        # a bare name (`settings.py`) or a tail (`agent/base.py`) mentioned in prose is fine anywhere
        tree = Tree(set(), [])
        for entry in entries:
            parts = entry.rstrip("/").split("/")
            tree.tails.update("/".join(parts[i:]) for i in range(len(parts)))
        if os.path.isfile(os.path.join(root, ".gitignore")) and locate(root, "", ".gitignore") is not None:
            tree.ignored = ignore_patterns(read_bounded(os.path.join(root, ".gitignore"), MAX_DOC_BYTES)[0])
        checks: dict[tuple[str, str, str, str], Check] = {}
        for ref in scan(text, {e.rstrip("/") for e in top}, name, lambda cwd, p: self.is_dir(root, cwd, p)):
            lines = checks.setdefault((ref.kind, ref.shown, ref.cwd, ref.path), Check(ref)).lines
            if not lines or lines[-1] != ref.line:
                lines.append(ref.line)
        todo = list(checks.values())[:MAX_CHECKS]
        findings: list[tuple[int, str]] = []
        for item in todo:
            ref = item.ref
            yield {"type": "agent_action", "action": "check",
                   "args": {"kind": ref.kind, "target": ref.shown, "lines": item.lines}}
            seen, problem = self.check(root, ref, tree)
            yield {"type": "observation", "observation": "check", "content": seen}
            if problem:
                path = posixpath.join(ref.cwd, ref.path) if ref.cwd else ref.path  # as run from the root
                kind = "program" if ref.kind == "command" and ref.shown == path else ref.kind
                text_ = PROBLEMS[kind, problem].format(shown=ref.shown, path=path)
                findings.extend((line, f"line {line}: {text_}") for line in item.lines)
        findings.sort(key=lambda finding: finding[0])  # by line; on one line, in the README's order
        yield message(self.summary(repository, name, todo, len(checks) - len(todo), findings, cut))

    @staticmethod
    def is_dir(root: str, cwd: str, path: str) -> str | None:
        """The repository-relative folder `path` names from `cwd` (for `cd`), or None."""
        rel = locate(root, cwd, path)
        return rel if rel is not None and os.path.isdir(os.path.join(root, rel)) else None

    @staticmethod
    def check(root: str, ref: Ref, tree: Tree) -> tuple[str, str | None]:
        """(what the check saw, the problem's key or None)."""
        rel = locate(root, ref.cwd, ref.path)
        if rel is None:
            return f"{ref.path}: outside the repository, not looked at", "outside"
        full = os.path.join(root, rel)
        shown = rel or "."
        if not os.path.exists(full):
            if ref.loose and rel in tree.tails:
                return f"{shown}: not at the root, but exists in the tree", None
            if ref.kind != "link" and ignored(tree.ignored, rel):  # a link must work on the forge, though
                return f"{shown}: does not exist, but .gitignore covers it: made when the project runs", None
            return f"{shown}: does not exist", "missing"
        is_dir = os.path.isdir(full)
        if ref.need == "dir" and not is_dir:
            return f"{shown}: a file, not a folder", "not_dir"
        if ref.need in ("file", "exec") and is_dir:
            return f"{shown}: a folder, not a file", "is_dir"
        if ref.need == "exec" and not os.access(full, os.X_OK):
            return f"{shown}: a file, not executable", "not_exec"
        if ref.fragment and not is_dir and rel.lower().endswith((".md", ".markdown")):
            if rel not in tree.headings:
                tree.headings[rel] = anchors(read_bounded(full, MAX_DOC_BYTES)[0])
            if ref.fragment.lower() not in tree.headings[rel]:
                return f"{shown}: exists, but has no section #{ref.fragment}", "no_section"
            return f"{shown}: exists, with section #{ref.fragment}", None
        return f"{shown}: {'folder' if is_dir else 'file'} exists", None

    @staticmethod
    def summary(repository: str, name: str, done: list[Check], skipped: int,
                findings: list[tuple[int, str]], cut: bool) -> str:
        """The closing message: what was checked, and each problem with its README line."""
        kinds = [sum(c.ref.kind == kind for c in done) for kind in ("link", "path", "command")]
        checked = (f"I read {name} of {repository} and checked {plural(kinds[0], 'link')}, "
                   f"{plural(kinds[1], 'path')} and {plural(kinds[2], 'command')}")
        notes = ""
        if skipped:
            notes += f"\n\nI stopped after {MAX_CHECKS} checks: {skipped} more were not made."
        if cut:
            notes += f"\n\n{name} is longer than {MAX_README_BYTES // 1024} KiB: I read only its start."
        if not findings:
            return f"{checked}: nothing is wrong, each one points to something that exists.{notes}"
        lines = "\n".join(f"- {text}" for _, text in findings)
        return f"{checked}. {plural(len(findings), 'thing')} look wrong:\n\n{lines}{notes}"


SAMPLE_README = """\
# hello

A tiny program that greets you. It is the readme agent's sample repository: this README has a
few deliberate mistakes for the agent to find (ask it to check the README).

## Run it

```sh
python3 hello.py --name you
python3 greet.py
```

Run its tests with `scripts/test.sh`. The options are described in [the usage guide](docs/usage.md),
[its options section](docs/usage.md#options) and [the setup guide](docs/setup.md).

## Install

There is nothing to install; see [Run it](#run-it) and [Configuration](#configuration).

Licensed under the terms in [LICENSE](LICENSE).
"""
SAMPLE_FILES = {
    "README.md": SAMPLE_README,
    "hello.py": 'import argparse\n\nparser = argparse.ArgumentParser()\nparser.add_argument("--name", '
                'default="world")\nprint(f"Hello, {parser.parse_args().name}!")\n',
    "docs/usage.md": "# Usage\n\n## Options\n\n`--name NAME`: who to greet (default: world).\n",
    "scripts/test.sh": '#!/bin/sh\nset -e\ncd "$(dirname "$0")/.."\npython3 hello.py --name test\n',
    "LICENSE": "Public domain.\n",
}


def make_sample_repository(workspace: Path) -> str:
    """Write the sample repository sample/hello into `workspace` (its files replaced if there) and name it."""
    root = Path(workspace) / "sample" / "hello"
    for rel, content in SAMPLE_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (root / "scripts" / "test.sh").chmod(0o755)
    return "sample/hello"
