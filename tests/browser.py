"""Browser fixtures (a pytest plugin): Debian's Chromium under Playwright, axe-core, a fake LLM, a web stack."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app import create_app
from app.redis import close

from .agent_workers import AgentWorker
from .fake_llm import FakeLLM
from .servers import ROOT, Gunicorn, RedisServer

AXE_VERSION = "4.11.0"  # axe-core, from the npm registry
CACHE = ROOT / "var" / "test-cache"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def chromium_path() -> str | None:
    """Debian's Chromium (or $CHROMIUM): the tests never download a browser of their own."""
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def unavailable(what: str) -> None:
    """Skip a browser test for want of `what`; in CI, where .ci/run installs it, fail instead."""
    if IN_CI:
        pytest.fail(f"{what} is missing in CI (.ci/run installs it)")
    pytest.skip(f"{what} is not installed; .ci/run installs it (or: apt-get install chromium npm)")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the run."""
    path = chromium_path()
    if path is None:
        unavailable("Chromium (Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # As root (CI) Chromium refuses to start sandboxed; a small /dev/shm in a container crashes it.
        args = ["--disable-dev-shm-usage"] + (["--no-sandbox"] if os.geteuid() == 0 else [])
        chromium = playwright.chromium.launch(executable_path=path, headless=True, args=args)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    """A page in a fresh context (no cookies), with its console lines and uncaught errors recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.console_lines = []
    page.page_errors = []
    page.on("console", lambda message: page.console_lines.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: page.page_errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="session")
def axe_source() -> str:
    """axe-core's axe.min.js, from the npm registry on first use, then from var/test-cache."""
    target = CACHE / f"axe-core-{AXE_VERSION}.min.js"
    if not target.exists():
        npm = shutil.which("npm")
        if npm is None:
            unavailable("npm (for axe-core)")
        CACHE.mkdir(parents=True, exist_ok=True)
        # A folder of this run's own: test runs side by side never share a tarball or a partial file.
        work = Path(tempfile.mkdtemp(dir=CACHE))
        try:
            try:
                packed = subprocess.run([npm, "pack", f"axe-core@{AXE_VERSION}", "--pack-destination", str(work),
                                         "--silent"], capture_output=True, text=True, timeout=180)
            except subprocess.TimeoutExpired:
                pytest.fail(f"npm pack axe-core@{AXE_VERSION} took over 180 s (is the npm registry reachable?)")
            if packed.returncode != 0:
                pytest.fail(f"npm pack axe-core@{AXE_VERSION} failed: {packed.stderr.strip()[-500:]}")
            with tarfile.open(work / packed.stdout.strip().splitlines()[-1]) as archive:
                member = archive.extractfile("package/axe.min.js")
                assert member is not None, "axe-core's package has no axe.min.js"
                script = member.read()
            assert b"axe.version" in script or b"axe-core" in script, "axe.min.js does not look like axe-core"
            (work / "axe.min.js").write_bytes(script)
            (work / "axe.min.js").replace(target)  # whole or not at all, atomically
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target.read_text()


@pytest.fixture()
def fake_llm() -> Iterator[FakeLLM]:
    """A fake chat-completions server (it wants the key "test-key"), stopped after the test."""
    server = FakeLLM(key="test-key").start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class WebStack:
    """A running server (gunicorn, gevent workers) and agent worker on one Redis, with alice's key."""

    gunicorn: Gunicorn
    agent: AgentWorker
    redis_url: str
    make_key: Callable[[str], str]
    key: str = ""
    api: Any = field(default=None)

    @property
    def base(self) -> str:
        """http://127.0.0.1:<port>."""
        return self.gunicorn.base


@pytest.fixture()
def start_web(redis_server: RedisServer, redis_client: Any, tmp_path: Path) -> Iterator[Callable[..., WebStack]]:
    """Start gunicorn and an agent worker (`AGENT=agent`, `env` to both); all stopped after the test."""
    from .conftest import Api

    stacks: list[WebStack] = []
    apps: list[Any] = []

    def start(agent: str = "auto", workers: int = 1, redis_url: str | None = None, **env: str) -> WebStack:
        url = redis_url or redis_server.url
        workspace = tmp_path / "workspace"
        workspace.mkdir(exist_ok=True)
        settings = {"AGENT": agent, "AGENT_WORKSPACE": str(workspace), **env}
        n = len(stacks) + 1
        gunicorn = Gunicorn(url, workers=workers, **settings)
        agent_worker = AgentWorker(url, tmp_path / f"agent-{n}.log", **settings)
        app = create_app({"REDIS_URL": url, "TESTING": True})
        apps.append(app)
        store = app.extensions["store"]
        stack = WebStack(gunicorn, agent_worker, url, lambda user_id: store.create_api_key(user_id)[1])
        stacks.append(stack)
        gunicorn.start(tmp_path / f"gunicorn-{n}.log")
        agent_worker.start()
        stack.key = stack.make_key("alice")
        stack.api = Api(stack.base, stack.key)
        return stack

    try:
        yield start
    finally:
        for stack in stacks:
            stack.agent.stop()
            stack.gunicorn.stop()
        for app in apps:
            close(app.extensions["redis"])
