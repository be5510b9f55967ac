"""The registered components as Markdown tables, generated from the registries so the docs cannot drift.

``python -m mmclin.interfaces.components_doc > docs/components.md`` regenerates the page;
``tests/test_docs.py`` fails when the page differs from :func:`render_components`.

    >>> "| `concat` |" in render_components()
    True
"""
from __future__ import annotations

import inspect
import re
import sys
from typing import Any

COMMAND = "python -m mmclin.interfaces.components_doc > docs/components.md"


def summary(obj: Any) -> str:
    """The first sentence of ``obj``'s docstring, as one Markdown line (RST literals and roles made plain)."""
    doc = inspect.getdoc(obj) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z`])", paragraph, maxsplit=1)[0]
    sentence = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", sentence)  # :class:`X` -> `X`
    sentence = sentence.replace("``", "`")
    return sentence.replace("|", "\\|") or "–"


def _source(obj: Any) -> str:
    return f"`{obj.__module__.replace('.', '/')}.py`"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_components() -> str:
    """Markdown tables of every registered encoder, modality kind, fusion head and task."""
    from mmclin.registry import ENCODERS, FEATURIZERS, FUSIONS, TASKS, load_builtin_components

    load_builtin_components()
    lines = [
        "# Registered components",
        "",
        f"Generated from the registries (`mmclin.registry`) by `{COMMAND}`: after registering",
        "a component, run that command; `tests/test_docs.py` fails while this page is out of date.",
        "A config or estimator names a component by the name in the first column. How to add one:",
        "[extending.md](extending.md).",
        "",
        "## Modality kinds",
        "",
        "A `ModalitySpec`'s `kind` picks the featurizer (fitted on the training rows) and, unless the spec names",
        "an `encoder`, the encoder registered under the kind's name.",
        "",
    ]
    kinds = sorted(set(FEATURIZERS.names()) | {ENCODERS.get(n).kind for n in ENCODERS.names()})
    rows = []
    for kind in kinds:
        encoders = [n for n in ENCODERS.names() if ENCODERS.get(n).kind == kind]
        default = f"`{kind}`" if kind in ENCODERS else "–"
        others = ", ".join(f"`{n}`" for n in encoders if n != kind) or "–"
        rows.append([f"`{kind}`", "yes" if kind in FEATURIZERS else "no", default, others])
    lines += _table(["kind", "featurizer", "default encoder", "other encoders"], rows)

    lines += ["", f"## Encoders ({len(ENCODERS.names())})", ""]
    rows = []
    for name in ENCODERS.names():
        cls = ENCODERS.get(name)
        needs = ", ".join(f"`{m}`" for m in getattr(cls, "requires", ())) or "–"
        rows.append([f"`{name}`", f"`{cls.kind}`", summary(cls), needs, _source(cls)])
    lines += _table(["name", "kind", "summary", "optional packages", "defined in"], rows)

    lines += ["", f"## Fusion heads ({len(FUSIONS.names())})", ""]
    lines += _table(["name", "summary", "defined in"],
                    [[f"`{n}`", summary(FUSIONS.get(n)), _source(FUSIONS.get(n))] for n in FUSIONS.names()])

    lines += ["", f"## Tasks ({len(TASKS.names())})", ""]
    rows = []
    for name in TASKS.names():
        cls = TASKS.get(name)
        metric = f"`{cls.primary_metric}`" if cls.primary_metric else "from the options"
        rows.append([f"`{name}`", f"`{cls.problem}`" if cls.problem else "–", metric, summary(cls), _source(cls)])
    lines += _table(["name", "problem", "primary metric", "summary", "defined in"], rows)
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render_components())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
