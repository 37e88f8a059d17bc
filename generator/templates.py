"""What both generators share: the Jinja set-up (templates from configs/<proxy>/, missing keys are
errors) and validation of the rendered text by the proxy itself."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import jinja2


class CheckError(RuntimeError):
    """The proxy refused the rendered config; the message is the proxy's own output."""


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
        result = subprocess.run(argv(handle.name), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise CheckError((result.stdout + result.stderr).strip()[-4000:])
