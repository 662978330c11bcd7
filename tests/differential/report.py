"""Print the divergence table of docs/traefik-differences.md from a real run.

    .venv/bin/python -m tests.differential.report            # print the table
    .venv/bin/python -m tests.differential.report --write    # replace it in the doc

Runs every case of test_http_vs_traefik.py that is listed as a divergence (DIVERGENT, status
"to fix") or a deliberate difference (DELIBERATE) through real Traefik and meshproxy, and prints
one Markdown row per case: the raw request, what each did, and the status with its reason. The
table in the docs is pasted from this output, so it says what the code does, not what we hoped.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.differential import test_http_vs_traefik as cases_module
from tests.differential.harness import Differential, RecordingBackend

DOC = Path(__file__).resolve().parents[2] / "docs" / "traefik-differences.md"
BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"

PAIRS = {
    "main": (cases_module.main_config, ()),
    "trusted": (cases_module.main_config, cases_module.TRUSTED_FLAGS),
    "rules": (cases_module.rules_config, ()),
    "strict": (cases_module.main_config, cases_module.STRICT_FLAGS),
    "raised": (cases_module.main_config, cases_module.RAISED_FLAGS),
}
LISTS = {
    "main": [
        ("4", cases_module.ITEM4),
        ("4", cases_module.FRAMING),
        ("5", cases_module.ITEM5),
        ("8", cases_module.ITEM8),
        ("9", cases_module.ITEM9),
        ("10", cases_module.ITEM10),
        ("11", cases_module.ITEM11),
        ("12", cases_module.ITEM12),
        ("13", cases_module.ITEM13),
        ("head", cases_module.HEAD_SYNTAX),
        ("14", cases_module.ITEM14),
        ("16", cases_module.EXPECT_ODD),
        ("mw", cases_module.MIDDLEWARES),
        ("fields", cases_module.FIELD_CASES),
        ("fields", cases_module.RESPONSE_FIELD_CASES),
        ("persistence", cases_module.CLOSING),
        ("6", cases_module.SLOW),
    ],
    "trusted": [("14", cases_module.TRUSTED)],
    "rules": [("rules", cases_module.RULE_CASES)],
    "strict": [("8, 12", cases_module.STRICT)],
    "raised": [("12", cases_module.RAISED)],
}


def _escape(text: str) -> str:
    """CR, LF, other control and non-ASCII characters as escapes (Python's repr style)."""
    names = {"\r": "\\r", "\n": "\\n"}
    return "".join(names.get(c, c if " " <= c <= "~" else f"\\x{ord(c):02x}") for c in text)


def show(raw: bytes) -> str:
    """The raw request for a table cell: long lines and long heads elided, bytes escaped."""
    text = raw.decode("latin-1")
    head, _, body = text.partition("\r\n\r\n")
    lines = [_escape(line) for line in head.split("\r\n")]
    parts = [line if len(line) <= 70 else f"{line[:30]}…({len(line)} chars)" for line in lines]
    if len(parts) > 6:
        parts = [*parts[:4], f"…({len(parts) - 4} more lines)"]
    out = "\\r\\n".join(parts) + "\\r\\n\\r\\n" + _escape(body)
    return "`" + out.replace("|", "\\|").replace("`", "'") + "`"


def table() -> str:
    """Run the listed cases through a real pair per config; the Markdown table and notes."""
    backend = RecordingBackend().start()
    rows = []
    notes: list[str] = []  # the deliberate reasons, numbered in order of first use
    try:
        for pair_name, lists in LISTS.items():
            make, flags = PAIRS[pair_name]
            wanted = [
                (item, c)
                for item, cases in lists
                for c in cases
                if c.id in cases_module.DIVERGENT or c.id in cases_module.DELIBERATE
            ]
            if not wanted:
                continue
            with Differential(Path(tempfile.mkdtemp()), make, flags, backend=backend) as pair:
                for item, case in wanted:
                    cmp = pair.compare(case.raw, timeout=10.0)
                    if case.id in cases_module.DIVERGENT:
                        status = f"**to fix**: {cases_module.DIVERGENT[case.id]}"
                    else:
                        why = cases_module.DELIBERATE[case.id]
                        if why not in notes:
                            notes.append(why)
                        status = f"deliberate, [D{notes.index(why) + 1}](#d{notes.index(why) + 1})"
                    rows.append(
                        f"| {item} | `{case.id}` | {show(cmp.raw)} | {cmp.traefik.summary()} "
                        f"| {cmp.meshproxy.summary()} | {status} |"
                    )
    finally:
        backend.close()
    lines = [
        "| item | case | raw request | Traefik 3.7 | meshproxy | status |",
        "|---|---|---|---|---|---|",
    ]
    lines += rows
    lines.append("")
    lines += [f'<a id="d{i}"></a>**D{i}.** {why}.\n' for i, why in enumerate(notes, 1)]
    return "\n".join(lines)


def main() -> int:
    text = table()
    if "--write" not in sys.argv:
        print(text)
        return 0
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
