"""Every flag of every command line in train_scripts/ explains itself in --help (not just its default)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "train_scripts").glob("*.py"))


def option_helps(help_output: str) -> dict[str, str]:
    """{option invocation: its help text} of argparse's "options:" section (wrapped lines joined)."""
    section = help_output.split("\noptions:\n", 1)[1]
    entries: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        if line.startswith("  -"):
            invocation, _, text = line.strip().partition("  ")
            current = invocation
            entries[current] = text.strip()
        elif line.startswith("    ") and current is not None:
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    return entries


@pytest.fixture(scope="module")
def helps() -> dict[str, dict[str, str]]:
    out = {}
    for script in SCRIPTS:
        result = subprocess.run([sys.executable, str(REPO / "train_scripts" / script), "--help"], capture_output=True,
                                text=True, timeout=120, env=subprocess_env(COLUMNS="100"), cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        out[script] = option_helps(result.stdout)
    return out


def test_every_script_is_checked():
    assert {"lcm_lora.py", "pcm_lora.py", "rectified_diffusion.py", "swiftbrush.py", "ufogen.py",
            "dmd2.py", "generate_pairs.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_beyond_its_default(helps, script):
    entries = helps[script]
    assert len(entries) > 10, entries
    bare = {flag: text for flag, text in entries.items()
            if not re.sub(r"\(default: .*\)$", "", text).strip(" .")}
    assert not bare, f"{script}: flags without help: {sorted(bare)}"


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "generate_pairs.py"])
def test_no_export_pipeline_says_it_skips_the_pipeline_folder(helps, script):
    text = next(text for flag, text in helps[script].items() if flag.startswith("--no_export_pipeline"))
    assert re.search(r"\b(do not|does not|skip|skips)\b", text, re.I) and "pipeline" in text, text
    assert not text.lower().startswith("also write"), text
