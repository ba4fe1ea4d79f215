"""Build a Debian package (.deb) from the onedir bundle with ``dpkg-deb``.

    python3 packaging/build_deb.py [dist/cpu/cxrviewer] [--out dist/cpu] [--version 0.1.0]
    sudo apt install ./dist/cpu/cxrviewer_0.1.0_amd64.deb

What it installs:

* ``/opt/cxrviewer/``: the bundle as built (``cxrviewer``, ``_internal/``, ``THIRD_PARTY_LICENSES``);
* ``/usr/bin/cxrviewer``: a launcher script that runs ``/opt/cxrviewer/cxrviewer`` (so the
  bundle finds its ``_internal`` whatever the caller's path);
* ``/usr/share/applications/cxrviewer.desktop``: the menu entry, opening DICOM files
  (``application/dicom``), annotation projects (``*.cxrann``: the window opens a project given
  like a study) and the folders/images given to it;
* ``/usr/share/mime/packages/cxrviewer.xml``: the MIME types ``application/dicom`` (``*.dcm``,
  ``DICM`` at byte 128) and ``application/x-cxrviewer-project`` (``*.cxrann``, the annotation
  projects), so file managers name and show them;
* ``/usr/share/icons/hicolor/{256x256,scalable}/apps/cxrviewer.{png,svg}`` (from
  ``resources/icons``);
* ``/usr/share/doc/cxrviewer/copyright`` (cxrviewer's licence and the bundle's
  ``THIRD_PARTY_LICENSES``).

``postinst``/``postrm`` refresh the desktop, MIME and icon caches when those tools exist.
Nothing is written to or removed from users' home folders: annotation projects live in
``~/.local/share/cxrviewer`` (Qt's AppDataLocation) and stay after ``apt remove``/``purge``.

``Depends`` is computed from the bundle: the shared libraries its ELF files need that the
bundle does not carry, mapped to the build host's Debian packages (``dpkg -S``).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ICONS = REPO / "resources" / "icons"
PACKAGE = "cxrviewer"
PREFIX = Path("opt") / PACKAGE
PROJECT_MIME = "application/x-cxrviewer-project"

DESKTOP = f"""[Desktop Entry]
Type=Application
Name=CXR Viewer
GenericName=Chest X-ray Viewer
Comment=View, explain and annotate chest radiographs
Exec=cxrviewer %F
TryExec=cxrviewer
Icon=cxrviewer
Terminal=false
Categories=Science;MedicalSoftware;
MimeType=application/dicom;{PROJECT_MIME};
Keywords=DICOM;X-ray;radiograph;chest;annotation;
StartupNotify=true
"""

MIME_XML = f"""<?xml version="1.0" encoding="UTF-8"?>
<mime-info xmlns="http://www.freedesktop.org/standards/shared-mime-info">
  <mime-type type="application/dicom">
    <comment>DICOM image</comment>
    <glob pattern="*.dcm"/>
    <magic priority="60">
      <match type="string" offset="128" value="DICM"/>
    </magic>
  </mime-type>
  <mime-type type="{PROJECT_MIME}">
    <comment>CXR Viewer annotation project</comment>
    <sub-class-of type="application/octet-stream"/>
    <glob pattern="*.cxrann"/>
    <icon name="cxrviewer"/>
  </mime-type>
</mime-info>
"""

#: Refresh the caches a desktop entry, MIME package and icon feed; only with tools that exist.
REFRESH = """if command -v update-desktop-database >/dev/null 2>&1; then update-desktop-database -q /usr/share/applications || true; fi
if command -v update-mime-database >/dev/null 2>&1; then update-mime-database /usr/share/mime || true; fi
if command -v gtk-update-icon-cache >/dev/null 2>&1; then gtk-update-icon-cache -q -t -f /usr/share/icons/hicolor || true; fi
"""
POSTINST = "#!/bin/sh\nset -e\n" + REFRESH + "exit 0\n"
#: Nothing in users' homes: only the system caches (the package's own files go with dpkg).
POSTRM = ("#!/bin/sh\nset -e\ncase \"$1\" in\n  remove|purge|abort-install|abort-upgrade)\n"
          + "".join("    " + ln + "\n" for ln in REFRESH.splitlines()) + "    ;;\nesac\nexit 0\n")
LAUNCHER = f"#!/bin/sh\n# cxrviewer launcher (the Debian package's /usr/bin entry)\nexec /{PREFIX}/cxrviewer \"$@\"\n"


def project_version() -> str:
    """cxrviewer's version from pyproject.toml."""
    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["version"]


def deb_arch() -> str:
    """The host's Debian architecture (amd64, arm64, ...)."""
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def needed_sonames(bundle: Path) -> set[str]:
    """Sonames the bundle's ELF files need and the bundle does not carry."""
    have, need = set(), set()
    for root, _dirs, files in os.walk(bundle):
        for name in files:
            path = Path(root) / name
            have.add(name)
            if path.is_symlink() or not _is_elf(path):
                continue
            out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
            need.update(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))
    return {s for s in need if s not in have}


def soname_packages(sonames: set[str]) -> tuple[list[str], list[str]]:
    """(Debian packages providing ``sonames`` on this host, sonames no package provides here)."""
    cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    paths: dict[str, str] = {}
    for line in cache.splitlines():
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if m and ("64" in m.group(2) or m.group(1) not in paths):  # the 64-bit copy where both exist
            paths[m.group(1)] = m.group(3)
    packages, missing = set(), []
    for so in sorted(sonames):
        path = paths.get(so)
        if path is None:
            missing.append(so)
            continue
        real = os.path.realpath(path)
        for candidate in (path, real, "/usr" + real if not real.startswith("/usr") else real):
            res = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
            if res.returncode == 0:
                packages.add(res.stdout.split(":", 1)[0].strip())
                break
        else:
            missing.append(so)
    return sorted(packages), missing


def control(version: str, arch: str, depends: list[str], installed_kib: int) -> str:
    """The DEBIAN/control text."""
    return (f"Package: {PACKAGE}\nVersion: {version}\nArchitecture: {arch}\n"
            "Maintainer: cxrviewer developers <cxrviewer@localhost>\nSection: science\nPriority: optional\n"
            f"Installed-Size: {installed_kib}\n"
            + (f"Depends: {', '.join(depends)}\n" if depends else "")
            + "Homepage: https://localhost/cxrviewer\n"
            "Description: chest X-ray explainability and annotation desktop\n"
            " cxrviewer opens DICOM/PNG/JPEG chest radiographs, runs its bundled models\n"
            " (classification, segmentation, alignment, CIA-Net) and shows their\n"
            " explanation panels; boxes are annotated into projects (.cxrann).\n"
            " Research software, not a medical device. Self-contained: Python, torch\n"
            " (CPU) and Qt are in /opt/cxrviewer.\n")


def stage(bundle: Path, root: Path, version: str, arch: str, depends: list[str]) -> None:
    """Lay the package's files out under ``root`` (the future ``/``)."""
    shutil.copytree(bundle, root / PREFIX, symlinks=True)
    files = {
        "usr/bin/cxrviewer": (LAUNCHER, 0o755),
        "usr/share/applications/cxrviewer.desktop": (DESKTOP, 0o644),
        "usr/share/mime/packages/cxrviewer.xml": (MIME_XML, 0o644),
        "DEBIAN/postinst": (POSTINST, 0o755),
        "DEBIAN/postrm": (POSTRM, 0o755),
    }
    for rel, (text, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        path.chmod(mode)
    icons = root / "usr/share/icons/hicolor"
    for sub, name in (("256x256/apps", "cxrviewer.png"), ("scalable/apps", "cxrviewer.svg")):
        (icons / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ICONS / name, icons / sub / name)
    doc = root / "usr/share/doc" / PACKAGE
    doc.mkdir(parents=True)
    notices = bundle / "THIRD_PARTY_LICENSES"
    (doc / "copyright").write_text(
        "cxrviewer: BSD-3-Clause (see pyproject.toml).\n\nThird-party components in /opt/cxrviewer:\n\n"
        + (notices.read_text(encoding="utf-8") if notices.is_file() else "(no THIRD_PARTY_LICENSES in the bundle)\n"),
        encoding="utf-8")
    kib = sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(root) for f in fs
              if not os.path.islink(os.path.join(r, f))) // 1024
    (root / "DEBIAN/control").write_text(control(version, arch, depends, kib), encoding="utf-8")
    for dirpath, dirnames, _f in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)


def build_deb(bundle: Path, out_dir: Path, version: str | None = None, compression: str = "gzip",
              depends: list[str] | None = None, level: int = 6) -> tuple[Path, list[str]]:
    """Build ``cxrviewer_<version>_<arch>.deb`` in ``out_dir``; returns it and sonames left unmapped."""
    if not (bundle / "cxrviewer").is_file():
        raise SystemExit(f"{bundle} is not a cxrviewer onedir bundle (no 'cxrviewer' executable)")
    version = version or project_version()
    arch = deb_arch()
    missing: list[str] = []
    if depends is None:
        depends, missing = soname_packages(needed_sonames(bundle))
    out_dir.mkdir(parents=True, exist_ok=True)
    deb = out_dir / f"{PACKAGE}_{version}_{arch}.deb"
    with tempfile.TemporaryDirectory(prefix="cxrviewer-deb-", dir=out_dir) as td:
        root = Path(td) / "root"
        stage(bundle, root, version, arch, depends)
        subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", f"-z{level}", "--build", str(root),
                        str(deb)],
                       check=True, stdout=subprocess.DEVNULL)
    return deb, missing


def main(argv: list[str] | None = None) -> int:
    """Command line: build the .deb from a bundle folder."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="?", default=str(REPO / "dist" / "cpu" / "cxrviewer"))
    p.add_argument("--out", default=None, help="output folder (default: the bundle's parent)")
    p.add_argument("--version", default=None, help="package version (default: pyproject.toml's)")
    p.add_argument("--compression", default="gzip", choices=("gzip", "xz", "zstd", "none"),
                   help="dpkg-deb compressor (gzip: every dpkg reads it; xz: smaller, minutes slower)")
    p.add_argument("--level", type=int, default=6, help="compression level (dpkg-deb -z; default 6)")
    args = p.parse_args(argv)
    bundle = Path(args.bundle).resolve()
    deb, missing = build_deb(bundle, Path(args.out) if args.out else bundle.parent, args.version, args.compression,
                             level=args.level)
    print(f"{deb} ({deb.stat().st_size / 2**20:.0f} MiB)")
    if missing:
        print("libraries neither bundled nor found on this host (not in Depends): " + ", ".join(missing),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
