"""The repository layout keeps the standard library importable and the CLI working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_folder_does_not_shadow_stdlib():
    assert not (ROOT / "platform" / "__init__.py").exists()
    out = subprocess.run(
        [sys.executable, "-c", "import platform, ray; print(platform.system())"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Linux"


def test_console_script_help():
    exe = Path(sys.executable).parent / "mvtcae"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MVTCAE" in out.stdout


def test_model_api_imports_lazily():
    code = "import sys, mvtcae; assert 'torch' not in sys.modules; mvtcae.MVTCAE; assert 'torch' in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
