"""The README documents every setting the code reads, with the code's default."""
from __future__ import annotations

import re
from pathlib import Path

from app.config import SETTINGS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme_configuration_table_with_its_default():
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", README, flags=re.M))
    for name, (default, _parse, _meaning) in SETTINGS.items():
        assert name in rows, f"{name} is missing from the README's configuration table"
        if name not in ("REDIS_URL", "SECRET_KEY", "SECRET_KEY_FILE", "AGENT_WORKSPACE"):  # paths of this checkout
            expected = f"`{default}`" if default else "empty"
            assert rows[name].strip() == expected, f"{name}: README says {rows[name].strip()}, code {default!r}"
