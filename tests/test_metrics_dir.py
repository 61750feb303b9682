"""gunicorn.conf.py's metrics directory: named after the addresses really bound, and ours alone."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def conf(monkeypatch):
    """gunicorn.conf.py as a module (PROMETHEUS_MULTIPROC_DIR left as it was)."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    spec = importlib.util.spec_from_file_location("gunicorn_conf_under_test", ROOT / "gunicorn.conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # chosen in on_starting, not at load
    return module


def test_the_default_dir_follows_the_bound_address_not_bind(conf, monkeypatch, tmp_path):
    # `-b :8001` and `-b :8002` with the same BIND: two directories, never one.
    monkeypatch.setattr(conf.tempfile, "gettempdir", lambda: str(tmp_path))
    first, second = conf.default_metrics_dir([("", 8001)]), conf.default_metrics_dir([("", 8002)])
    assert first != second and os.path.dirname(first) == str(tmp_path / f"openhands-metrics-{os.getuid()}")
    assert conf.default_metrics_dir(["/run/app.sock"]) != conf.default_metrics_dir(["/run/other.sock"])
    server = SimpleNamespace(cfg=SimpleNamespace(address=[("127.0.0.1", 8002)]))
    conf.on_starting(server)
    made = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    assert made == conf.default_metrics_dir([("127.0.0.1", 8002)]) and os.path.isdir(made)
    assert conf.private_dir_problem(made) is None and conf.private_dir_problem(os.path.dirname(made)) is None
    assert os.stat(made).st_mode & 0o777 == 0o700


def test_a_dir_not_ours_alone_is_refused(conf, monkeypatch, tmp_path):
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    assert conf.private_dir_problem(str(good)) is None
    link = tmp_path / "link"
    link.symlink_to(good)
    assert "symbolic link" in conf.private_dir_problem(str(link))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "writable by group or others" in conf.private_dir_problem(str(shared))
    plain = tmp_path / "file"
    plain.write_text("")
    assert "not a directory" in conf.private_dir_problem(str(plain))
    uid = os.getuid()
    monkeypatch.setattr(conf.os, "getuid", lambda: uid + 1)
    assert "owned by uid" in conf.private_dir_problem(str(good))


def test_on_starting_refuses_a_planted_directory(conf, monkeypatch, tmp_path):
    monkeypatch.setattr(conf.tempfile, "gettempdir", lambda: str(tmp_path))
    server = SimpleNamespace(cfg=SimpleNamespace(address=[("127.0.0.1", 8003)]))
    path = Path(conf.default_metrics_dir(server.cfg.address))
    path.parent.mkdir()
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    path.symlink_to(elsewhere)  # an attacker's link where our files would go
    with pytest.raises(SystemExit, match="symbolic link"):
        conf.on_starting(server)
    path.unlink()
    path.parent.chmod(0o777)
    with pytest.raises(SystemExit, match="writable by group or others"):
        conf.on_starting(server)
