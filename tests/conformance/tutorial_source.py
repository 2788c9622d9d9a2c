"""The tutorial's three Python programs, read from the seed document at test time.

The tutorial ("Get started with IoT Hub module identity and module twin (Python)", a
Portuguese translation in ../shared/seed/) is Microsoft's text; we do not copy its code into
this repository. Instead the conformance suite extracts each program from its fenced
```python block and changes exactly one thing in it: the value on the
`CONNECTION_STRING = "..."` line. Trust in the emulator's CA comes from environment
variables (see `test_tutorial.py`), so the code itself is otherwise byte-for-byte what
Microsoft wrote.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

PROGRAMS = (
    "CreateModule.py",
    "UpdateModuleTwinDesiredProperties.py",
    "ReceiveModuleTwinDesiredPropertiesPatch.py",
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# The seed lives beside the repository: <repo>/../shared/seed/*.txt.
DEFAULT_SEED_DIR = REPO_ROOT.parent / "shared" / "seed"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
_FILE_NAME = re.compile(r"\*\*(?P<name>[A-Za-z_][A-Za-z0-9_]*\.py)\*\*")
_CONNECTION_STRING_LINE = re.compile(r'^(?P<lhs>[ \t]*CONNECTION_STRING[ \t]*=[ \t]*)"[^"\n]*"[ \t]*$', re.M)


class TutorialSourceError(Exception):
    """The seed document is missing or does not hold the three programs we expect."""


def seed_dir() -> Path:
    return Path(os.environ.get("EDGETWIN_SEED_DIR", DEFAULT_SEED_DIR))


def find_tutorial_document() -> Path:
    """The seed file that contains all three programs; fails loudly if there is none."""
    directory = seed_dir()
    candidates = sorted(directory.glob("*.txt")) if directory.is_dir() else []
    for path in candidates:
        text = path.read_text(encoding="utf-8")
        if all(f"**{name}**" in text for name in PROGRAMS):
            return path
    raise TutorialSourceError(
        f"no tutorial seed in {directory} (looked for *.txt naming {', '.join(PROGRAMS)}); "
        "the conformance suite needs ../shared/seed/ beside the repository "
        "(or EDGETWIN_SEED_DIR pointing at it)"
    )


def extract_programs(markdown: str) -> dict[str, str]:
    """Map each program's file name to its code.

    A program is a ```python block; its name is the last `**Name.py**` mentioned before the
    block ("create a file called **CreateModule.py**"), which holds in any translation.
    """
    programs: dict[str, str] = {}
    for fence in _FENCE.finditer(markdown):
        names = _FILE_NAME.findall(markdown, 0, fence.start())
        if not names or names[-1] not in PROGRAMS:
            continue
        name = names[-1]
        if name in programs:
            raise TutorialSourceError(f"two ```python blocks follow the mention of {name}")
        programs[name] = textwrap.dedent(fence.group("body"))
    missing = [name for name in PROGRAMS if name not in programs]
    if missing:
        raise TutorialSourceError(f"tutorial has no code block for {', '.join(missing)}")
    return programs


def load_programs() -> dict[str, str]:
    return extract_programs(find_tutorial_document().read_text(encoding="utf-8"))


def with_connection_string(code: str, connection_string: str) -> str:
    """The program with its one `CONNECTION_STRING = "..."` line pointing at `connection_string`."""
    matches = _CONNECTION_STRING_LINE.findall(code)
    if len(matches) != 1:
        raise TutorialSourceError(
            f"expected exactly one CONNECTION_STRING line in the program, found {len(matches)}"
        )
    if '"' in connection_string or "\\" in connection_string:
        raise ValueError("connection string must not contain quotes or backslashes")
    return _CONNECTION_STRING_LINE.sub(
        lambda m: f'{m.group("lhs")}"{connection_string}"', code, count=1
    )
