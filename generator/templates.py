"""The one Jinja set-up both generators use: templates from configs/<proxy>/, missing keys are errors."""

from __future__ import annotations

from typing import Any

import jinja2


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
