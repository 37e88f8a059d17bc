"""What both generators share: the Jinja set-up (templates from configs/<proxy>/, missing keys are
errors), validation of the rendered text by the proxy itself, and the two values that reach a
config from outside the validated fleet: the fleet file's path (header comment) and ``--lua-dir``.

Both are decided by allow-list. ``--lua-dir`` must be an absolute path of ``A-Z a-z 0-9 _ . - /``
(the fleet's own rule for paths on a config line, ``fleet.schema._socket_path``), else it is
refused. The fleet path is shown as-is when every character is in a small printable set, else as
a JSON string with everything outside printable ASCII escaped, so it can never leave its comment
line (no newline, CR, NEL, U+2028, tab or other control character reaches the config).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import jinja2

from fleet.schema import _socket_path

# Shown unquoted in a comment; anything else (including quotes and backslashes, so the two forms
# cannot be confused) is shown as a JSON string.
_COMMENT_SAFE = re.compile(r"[A-Za-z0-9_./+,:=@~<>()-]+( [A-Za-z0-9_./+,:=@~<>()-]+)*")


class CheckError(RuntimeError):
    """The proxy refused the rendered config; the message is the proxy's own output."""


def comment_text(value: str) -> str:
    """``value`` as it may appear inside a one-line ``#`` comment of haproxy.cfg or envoy.yaml."""
    return value if _COMMENT_SAFE.fullmatch(value) else json.dumps(value, ensure_ascii=True)


def lua_file(lua_dir: str, name: str) -> str:
    """``<lua_dir>/<name>`` for a config line; ValueError (one line) unless lua_dir passes the allow-list."""
    return f"{_socket_path(lua_dir).rstrip('/')}/{name}"


def render(proxy: str, template: str, context: dict[str, Any]) -> str:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("configs", proxy),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return environment.get_template(template).render(context)


def validate(argv: Callable[[str], list[str]], text: str, suffix: str) -> None:
    """Run the proxy's own check (``argv(path)``) on ``text`` written to a temporary file."""
    with tempfile.NamedTemporaryFile("w", suffix=suffix, prefix="paddler-check-") as handle:
        handle.write(text)
        handle.flush()
        result = subprocess.run(argv(handle.name), check=False, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise CheckError((result.stdout + result.stderr).strip()[-4000:])
