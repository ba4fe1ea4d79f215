"""Time from starting cxrviewer to its main window being mapped on an X display.

    xvfb-run -a -s "-screen 0 1440x900x24" python3 packaging/startup_time.py \\
        dist/cpu/cxrviewer/cxrviewer [--compare ".venv/bin/python -m cxrviewer"] [--runs 3]

Each run starts the command with a fresh HOME (no restored session or last project),
QT_QPA_PLATFORM=xcb, and polls ``xwininfo`` until a window named ``cxrviewer`` is viewable;
the process is then terminated. With ``--compare`` the two commands alternate (frozen,
unfrozen, frozen, ...) so that both see the same load; the load average is recorded beside
every run. Prints one JSON object (also to ``--json``). The page cache is not dropped: the
first run after a build is "first start", not a cold disk.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TITLE = "cxrviewer"


def window_viewable(title: str = TITLE) -> bool:
    """True when a top-level window named ``title`` is mapped and viewable."""
    tree = subprocess.run(["xwininfo", "-root", "-tree"], capture_output=True, text=True).stdout
    for wid in re.findall(r"^\s+(0x[0-9a-f]+) \"" + re.escape(title) + r"\"", tree, re.M):
        info = subprocess.run(["xwininfo", "-id", wid], capture_output=True, text=True).stdout
        if "IsViewable" in info:
            return True
    return False


def time_to_window(cmd: list[str], timeout: float = 120.0) -> dict:
    """Start ``cmd``; seconds until its main window is viewable (None on timeout or exit)."""
    with tempfile.TemporaryDirectory(prefix="cxrviewer-start-") as home:
        env = {**os.environ, "HOME": home, "QT_QPA_PLATFORM": "xcb", "CXRVIEWER_DATA_DIR": str(Path(home) / "data"),
               "XDG_CONFIG_HOME": str(Path(home) / ".config"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        errlog = open(Path(home) / "stderr.txt", "w+b")  # noqa: SIM115 - read back below
        proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=errlog)
        seconds = None
        try:
            while time.perf_counter() - t0 < timeout and proc.poll() is None:
                if window_viewable():
                    seconds = time.perf_counter() - t0
                    break
                time.sleep(0.05)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errlog.seek(0)
        err = errlog.read().decode(errors="replace")[-500:] if seconds is None else ""
        errlog.close()
        return {"seconds": None if seconds is None else round(seconds, 2), "load_1min": round(load, 2),
                **({"stderr": err} if err else {})}


def _absolute(cmd: list[str]) -> list[str]:
    """The command with a relative program path made absolute (runs start in a temporary HOME)."""
    return [os.path.abspath(cmd[0]) if os.sep in cmd[0] else cmd[0], *cmd[1:]]  # not resolve(): venv links


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", help="the program to start (e.g. dist/cpu/cxrviewer/cxrviewer), quoted if several words")
    p.add_argument("--compare", default=None, help="a second command, alternated with the first")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    if not os.environ.get("DISPLAY") or shutil.which("xwininfo") is None:
        print("needs an X display (run under xvfb-run) and xwininfo (x11-utils)", file=sys.stderr)
        return 2
    commands = {"main": _absolute(shlex.split(args.command))}
    if args.compare:
        commands["compare"] = _absolute(shlex.split(args.compare))
    runs: dict[str, list[dict]] = {k: [] for k in commands}
    for _ in range(args.runs):
        for key, cmd in commands.items():
            runs[key].append(time_to_window(cmd))
    result = {"commands": {k: " ".join(v) for k, v in commands.items()}, "runs": runs}
    for key, rows in runs.items():
        ok = sorted(r["seconds"] for r in rows if r["seconds"] is not None)
        result[f"{key}_median_s"] = ok[len(ok) // 2] if ok else None
    if args.compare and result["main_median_s"] and result["compare_median_s"]:
        result["ratio_main_to_compare"] = round(result["main_median_s"] / result["compare_median_s"], 2)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0 if all(r["seconds"] is not None for rows in runs.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
