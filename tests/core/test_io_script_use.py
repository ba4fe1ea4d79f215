"""Library use from a script without a main guard (issue 15, item 12): the decoder child starts
without running the caller's script again, so a compressed DICOM loads once and correctly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_J2K = REPO / "resources" / "demo_dicom" / "RG1_J2KR.dcm"  # JPEG 2000: decoded in the child

SCRIPT = """\
import sys
from cxrviewer.core.io import load_study
study = load_study(sys.argv[1])
print("LOADED", study.shape, flush=True)
"""


def test_unguarded_script_decodes_in_the_child_once(tmp_path: Path) -> None:
    script = tmp_path / "user_script.py"  # no `if __name__ == "__main__"` guard, on purpose
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(DEMO_J2K)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("LOADED")]
    assert len(lines) == 1, out.stdout  # the child did not run the script again
