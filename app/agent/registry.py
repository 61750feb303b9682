"""Which agent answers: a built-in name, or `module:Class` of the user's own."""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .base import Agent

BUILTIN = {
    "echo": "app.agent.echo:EchoAgent",
    "auto": "app.agent.echo:AutoAgent",
    "readme": "app.agent.readme:ReadmeAgent",
    "llm": "app.agent.llm:LlmAgent",
}


class AgentNotFound(ValueError):
    """The agent setting names nothing that can be loaded."""


def load_agent(spec: str, settings: Mapping[str, Any]) -> Agent:
    """An instance of the agent `spec` names (a built-in name or module:Class)."""
    target = BUILTIN.get(spec, spec)
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise AgentNotFound(f"unknown agent {spec!r}: use one of {', '.join(sorted(BUILTIN))} or module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AgentNotFound(f"agent {spec!r}: cannot import {module_name} ({err})") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, Agent):
        raise AgentNotFound(f"agent {spec!r}: {target} is not a subclass of app.agent.base.Agent")
    return cls(settings)
