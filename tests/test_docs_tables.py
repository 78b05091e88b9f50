"""The README's reference tables agree with the code: the configuration names (generated from
``zu_fast.config.keys``), the sections, every ``ZU_FAST_*`` environment variable the code reads, and the Layout.

Regenerate the configuration table with ``python docs/make_tables.py --write``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _make_tables():
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "docs" / "make_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _section(title: str) -> str:
    """The README's text from ``## title`` to the next ``## ``."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_config_table_is_generated_from_keys():
    mt = _make_tables()
    assert mt.readme_config_block(README) == mt.config_table(), (
        "README's configuration table differs from zu_fast/config/keys.py: run `python docs/make_tables.py --write`")


def test_config_table_names_every_flat_key_and_field():
    from zu_fast.config.keys import FLAT, NO_EFFECT, REFERENCE_RULES
    from zu_fast.config.sections import SECTIONS, section_field_names

    block = _make_tables().readme_config_block(README)
    for key in [*FLAT, *REFERENCE_RULES, *NO_EFFECT]:
        assert f"`{key}`" in block, key
    for section in SECTIONS:
        for name in section_field_names(section):
            assert f"| `{section}.{name}` |" in block, f"{section}.{name}"


def test_sections_table_lists_every_section():
    from zu_fast.config.sections import SECTIONS

    text = _section("Configuration")
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))
    assert rows >= set(SECTIONS), f"sections missing from README's table: {sorted(set(SECTIONS) - rows)}"


def test_every_env_var_is_documented():
    in_code = _make_tables().code_env_vars()
    assert "ZU_FAST_CACHE" in in_code and len(in_code) >= 8  # the scan itself found the code's variables
    table = set(re.findall(r"^\| `(ZU_FAST_[A-Z_]+)` \|", _section("Environment variables"), re.M))
    assert in_code <= table, f"ZU_FAST_* variables read by the code but missing from README: {sorted(in_code - table)}"
    assert table <= in_code, f"README documents variables no code reads: {sorted(table - in_code)}"


@pytest.mark.parametrize("kind", ["module", "named"])
def test_layout_matches_the_tree(kind):
    text = _section("Layout")
    named = set(re.findall(r"^(zu_fast/\S+\.py)\s", text, re.M))
    tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "zu_fast").rglob("*.py")}
    if kind == "module":
        assert tree <= named, f"modules missing from README's Layout: {sorted(tree - named)}"
    else:
        assert named <= tree, f"README's Layout names modules that do not exist: {sorted(named - tree)}"
