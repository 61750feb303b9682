"""What a README points at: its relative links, the paths it mentions, the files its commands run."""
from __future__ import annotations

import fnmatch
import posixpath
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`{]*)")
INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
INLINE_LINK = re.compile(r"\]\(\s*(<[^>\n]*>|[^\s)]+)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"<(?:a|img|source)\b[^>]*?\s(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
HTML_ID = re.compile(r"<[a-z][^>]*?\s(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
UNDERLINE = re.compile(r"^ {0,3}(=+|-+)\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
LOCATION = re.compile(r"(::\S*|:\d+(:\d+)?|#L\d+(-L?\d+)?)$")  # app.py:12, tests/x.py::test_y, a.py#L3
PROMPT = re.compile(r"^\s*(?:\([^)\s]+\)\s*)?[$%]\s+")  # "$ ", "(venv) $ "
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
INTERPRETER = re.compile(r"python[0-9.]*|py|pypy3?|node|nodejs|ts-node|tsx|bash|sh|zsh|dash|ksh|fish|ruby|perl|"
                         r"php|Rscript|lua|julia|source|\.")
SCRIPT = re.compile(r"\.(py|sh|bash|js|mjs|ts|rb|pl|php)$")
NOT_PLAIN = re.compile(r"[\s*?<>{}$~`'\"|;=,()\[\]@!%^&\\]")  # globs, variables, placeholders: not one path
SHELL_LANGS = {"", "sh", "bash", "shell", "zsh", "fish", "console", "shell-session", "sh-session", "terminal"}
PROMPT_LANGS = {"console", "shell-session", "sh-session", "terminal"}  # lines without a prompt are output
WRAPPERS = {"sudo", "env", "time", "exec", "nohup", "nice", "command"}
RUNNERS = {"poetry", "pipenv", "uv", "pdm", "hatch", "rye"}  # "<runner> run <command>"
INLINE_PROGRAM = {"-c", "-m", "-e", "--eval", "-p", "--print"}  # the program is no file of the repository
VALUE_OPTIONS = {"-W", "-X", "-o", "-r", "--require", "--rcfile", "--init-file"}
EXTENSIONS = frozenset(
    "md markdown rst txt adoc py pyi ipynb sh bash zsh ps1 bat cmd js mjs cjs ts tsx jsx vue svelte json jsonc yaml "
    "yml toml cfg ini conf env properties html htm css scss sass less go rs c h cc cpp hpp cs java kt kts scala rb "
    "php pl lua r jl swift dart ex exs erl hs ml sql csv tsv xml lock gradle mk cmake proto graphql tf png jpg jpeg "
    "gif svg pdf".split())


@dataclass(frozen=True)
class Ref:
    """One thing the README points at, on one line."""

    line: int
    kind: str  # link, path or command
    shown: str  # as the README writes it
    path: str  # what to look for, relative to cwd (a leading / is the repository's root)
    cwd: str = ""  # the folder a command runs in (after a `cd` in its block)
    need: str = "any"  # any, file, dir or exec
    fragment: str | None = None  # a link's #section
    loose: bool = False  # a path named in prose: found anywhere in the tree is fine


def lines_of(text: str) -> Iterator[tuple[int, str, str | None, int]]:
    """(line number, line, language of the fenced block it is in or None, block number); fences left out."""
    fence, lang, block = "", "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not fence:
            opening = FENCE.match(line)
            if opening:
                fence, lang, block = opening.group(1), opening.group(2).lower(), block + 1
                continue
            yield number, line, None, block
        elif line.strip().startswith(fence) and set(line.strip()) == {fence[0]}:
            fence = ""
        else:
            yield number, line, lang, block


def slug(title: str) -> str:
    """The anchor GitHub gives a heading."""
    title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading: its text
    title = re.sub(r"<[^>]+>", "", title).strip().lower()
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The #sections a markdown text has: its headings' anchors (numbered when repeated) and HTML ids."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    prose = [(line, kind) for _, line, kind, _ in lines_of(text)]
    for index, (line, kind) in enumerate(prose):
        if kind is not None:
            continue
        found.update(i.lower() for i in HTML_ID.findall(line))
        heading = HEADING.match(line)
        title = heading.group(1) if heading else None
        if title is None and line.strip() and index + 1 < len(prose) and prose[index + 1][1] is None \
                and UNDERLINE.match(prose[index + 1][0]) and not UNDERLINE.match(line):
            title = line
        if title is not None:
            anchor = slug(title)
            count = counts.get(anchor, 0)
            counts[anchor] = count + 1
            found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def plain(word: str) -> bool:
    """Whether `word` is one relative path as written (no glob, variable, URL or placeholder)."""
    return bool(word) and not NOT_PLAIN.search(word) and not word.startswith("/") and not SCHEME.match(word)


def looks_like_path(code: str, top: set[str]) -> bool:
    """Whether inline code names a file or folder of the repository (top: the names at its root)."""
    if not plain(code) or code.startswith("-") or code in (".", ".."):
        return False
    if code.startswith(("./", "../")) or code.endswith("/"):
        return True
    stem, dot, ext = code.rsplit("/", 1)[-1].rpartition(".")
    if dot and stem and ext.lower() in EXTENSIONS:
        # Node.js, Vue.js: a product's name, not a file
        return "/" in code or ext.lower() != "js" or not stem[:1].isupper()
    return "/" in code and code.split("/", 1)[0] in top


def link_ref(line: int, raw: str, readme: str) -> Ref | None:
    """The link's target as a Ref, or None for a URL or an e-mail address."""
    target = raw.strip().strip("<>")
    if not target or SCHEME.match(target) or target.startswith("//"):
        return None
    path, _, fragment = target.partition("#")
    path = unquote(path.split("?", 1)[0])
    return Ref(line, "link", target, path or readme, fragment=unquote(fragment) or None)


def words_of(line: str) -> list[str] | None:
    """A shell line's words and operators, or None when it does not parse (an open quote)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:
        return None


def commands_of(words: list[str]) -> Iterator[list[str]]:
    """The simple commands of a line's words: split at ; && || | &, without redirections."""
    command: list[str] = []
    redirect = False
    for word in words:
        if redirect:
            redirect = False
        elif word and set(word) <= set("();<>|&"):
            if "<" in word or ">" in word:
                redirect = True  # the next word is where output goes: no part of the command
                if command and command[-1].isdigit():
                    command.pop()  # the 2 of 2>&1
            elif command:
                yield command
                command = []
        else:
            command.append(word)
    if command:
        yield command


def command_target(words: list[str], strict: bool = True) -> tuple[str, str] | None:
    """(the repository file a command runs, what it must be: file or exec), or None when it runs none.

    Not strict (a fence without a language, often a tree of the layout): `dir/x` is not taken as a program.
    """
    while words and (words[0] in WRAPPERS or ASSIGNMENT.match(words[0])):
        words = words[1:]
    runner = len(words) >= 2 and words[0] in RUNNERS and words[1] == "run"
    if runner:
        words = words[2:]
    if not words:
        return None
    head, rest = words[0], words[1:]
    if INTERPRETER.fullmatch(posixpath.basename(head)):
        skip = False
        for word in rest:
            if skip:
                skip = False
            elif word in INLINE_PROGRAM:
                return None
            elif word in VALUE_OPTIONS:
                skip = True
            elif not word.startswith("-"):
                return (word, "file") if plain(word) else None
        return None
    if plain(head) and "/" in head and not head.endswith("/") and (strict or head.startswith(("./", "../"))):
        return head, "exec"  # run as a program: it must be executable too
    if runner and plain(head) and SCRIPT.search(head):
        return head, "file"
    return None


def command_refs(line: int, text: str, state: dict, is_dir: Callable[[str, str], str | None]) -> list[Ref]:
    """The files a shell line runs, with the folder its `cd`s lead to (state: the block's language, cwd, clones)."""
    words = words_of(text)
    refs: list[Ref] = []
    for command in commands_of(words or []):
        if state["cwd"] is None:
            break  # after a `cd` we cannot follow, relative paths mean nothing we can check
        if command[0] == "cd":
            dest = command[1] if len(command) > 1 else "~"
            if dest in state["clones"]:
                state["cwd"] = ""  # `git clone .../name && cd name`: this repository's root
            else:
                state["cwd"] = is_dir(state["cwd"], dest) if plain(dest) or dest == ".." else None
        elif command[:2] == ["git", "clone"]:
            args = [w for w in command[2:] if not w.startswith("-")]
            if args:
                url = args[0].rstrip("/")
                state["clones"].add(args[1] if len(args) > 1 else url.rsplit("/", 1)[-1].removesuffix(".git"))
        else:
            target = command_target(command, strict=state["lang"] != "")
            if target:
                shown = " ".join(command)
                shown = shown if len(shown) <= 120 else shown[:117] + "..."
                refs.append(Ref(line, "command", shown, target[0], cwd=state["cwd"], need=target[1]))
    return refs


def prose_refs(line: int, text: str, top: set[str], readme: str) -> list[Ref]:
    """The links, paths and commands of one line of prose."""
    refs: list[Ref] = []
    for match in INLINE_CODE.finditer(text):
        code = LOCATION.sub("", match.group(2).strip())
        if looks_like_path(code, top):
            refs.append(Ref(line, "path", code, code, need="dir" if code.endswith("/") else "any", loose=True))
            continue
        words = words_of(code)
        if words and (INTERPRETER.fullmatch(words[0]) or words[0] in WRAPPERS | RUNNERS):
            for command in commands_of(words):
                target = command_target(command)
                if target:
                    refs.append(Ref(line, "command", " ".join(command)[:120], target[0], need=target[1]))
    text = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), text)  # a link written in code is no link
    raws = INLINE_LINK.findall(text) + REFERENCE.findall(text) + HTML_LINK.findall(text)
    refs.extend(ref for ref in (link_ref(line, raw, readme) for raw in raws) if ref)
    return refs


def scan(text: str, top: set[str], readme: str, is_dir: Callable[[str, str], str | None]) -> list[Ref]:
    """Everything the README points at, in the order it does; `is_dir(cwd, path)` follows a `cd`."""
    refs: list[Ref] = []
    state: dict = {"block": -1}
    pending: tuple[int, str] | None = None  # a shell line ending in \ goes on on the next line
    for number, line, lang, block in lines_of(text):
        if block != state["block"]:
            state.update(block=block, lang=lang, cwd="", clones=set())
            pending = None
        if lang is None:
            refs.extend(prose_refs(number, line, top, readme))
            continue
        if lang not in SHELL_LANGS:
            continue
        if pending:
            number, line = pending[0], pending[1] + " " + line
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
            continue
        prompt = PROMPT.match(line)
        if prompt:
            line = line[prompt.end():]
        elif lang in PROMPT_LANGS:
            continue
        refs.extend(command_refs(number, line, state, is_dir))
    return refs


def ignore_patterns(text: str) -> list[str]:
    """The patterns of a .gitignore (negations left out: they only make us flag less)."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith(("#", "!"))]


def ignored(patterns: list[str], path: str) -> bool:
    """Whether a pattern covers `path` or a folder above it: a thing the project makes, not one it ships."""
    parts = path.strip("/").split("/")
    for pattern in patterns:
        anchored = "/" in pattern.rstrip("/")  # "bench/.venv/" is from the root; ".venv/" is anywhere
        bare = pattern.strip("/")
        for end in range(1, len(parts) + 1):
            if fnmatch.fnmatchcase("/".join(parts[:end]) if anchored else parts[end - 1], bare):
                return True
    return False
