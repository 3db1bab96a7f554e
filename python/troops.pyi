"""The `troops` module that deploy.py imports (type stub for editors).

Run by the agent, the context comes from the node: its roles and settings, the commit being
deployed and the one before it. Run by hand (`venv/bin/python deploy.py`), it reads the
node's /etc/troops/troops.toml (under $TROOPS_ROOT if set). Either way the deployables run
when the interpreter exits, after deploy.py's top level has finished.

A run ends when deploy.py exits: processes it started and left running (in its process
group) are stopped a few seconds later and named in the run's output, and a run longer than
`deploy_timeout` is stopped with everything it started. Start long-lived daemons with
systemd (`systemctl start`, `systemd-run`), never as children of deploy.py.
"""
from typing import Any, Callable, Iterable, Optional, Set, TypeVar, Union, overload

F = TypeVar("F", bound=Callable[[], Any])

roles: Set[str]
"""This node's roles: a plain set, pre-filled from the node's settings. Add to it freely."""

commit: Optional[str]
"""The commit being deployed (full hex id); None when run by hand."""

previous_commit: Optional[str]
"""The commit deployed before this one; None on a first deploy or when run by hand."""

settings: dict
"""The node's settings (/etc/troops/troops.toml) as a dict."""

root: str
"""The node's root prefix: "/" on a real node, a throwaway directory in tests and demos."""

defined_roles: dict
"""Roles given by define_role: name -> host patterns."""

def have_role(name: str) -> bool:
    """Whether this node has role `name` (now: roles added later count when checked later)."""

def define_role(name: str, hosts: Union[str, Iterable[str]]) -> bool:
    """Give this node role `name` if its fully qualified or short host name matches one of
    `hosts`: exact names or shell-style patterns ("web-*", "*.dc1.example.com"). Returns
    whether it matched."""

def hostname() -> str:
    """The node's fully qualified host name (settings may pin it)."""

@overload
def deployable(func: F) -> F: ...
@overload
def deployable(*, roles: Union[None, str, Iterable[str]] = None) -> Callable[[F], F]: ...
def deployable(func: Optional[F] = None, *, roles: Union[None, str, Iterable[str]] = None) -> Any:
    """Mark a function to run after deploy.py's top level, in definition order; with
    `roles`, only on nodes that have one of them. Each is recorded as ran, skipped or
    failed; after a failure the rest are skipped and the run fails."""
