"""`import hasten` stays light: no diffusers, scipy, typer or matplotlib at import time."""

import subprocess
import sys


def test_import_is_lean():
    code = (
        "import sys, hasten; "
        "heavy = [m for m in ('diffusers', 'scipy', 'typer', 'matplotlib', 'transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported by `import hasten`: {out.stdout}"
