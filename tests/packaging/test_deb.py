"""packaging/build_deb.py on a stand-in bundle (no PyInstaller build; a few seconds).

Checks the package's layout (/opt/cxrviewer, the /usr/bin launcher, desktop entry, MIME types,
icons, copyright), its control fields, that the desktop entry validates (desktop-file-validate,
when installed) and that the maintainer scripts never touch users' homes. Installing a real
bundle's .deb is the slow test in test_frozen_build.py.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")


def _load():
    spec = importlib.util.spec_from_file_location("cxrviewer_build_deb", REPO / "packaging" / "build_deb.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the .deb built from a stand-in bundle, the folder it was extracted to)."""
    tmp = tmp_path_factory.mktemp("deb")
    bundle = tmp / "cxrviewer"
    (bundle / "_internal").mkdir(parents=True)
    exe = bundle / "cxrviewer"
    exe.write_text("#!/bin/sh\necho stand-in \"$@\"\n", encoding="utf-8")
    exe.chmod(0o755)
    (bundle / "_internal" / "data.txt").write_text("x", encoding="utf-8")
    (bundle / "THIRD_PARTY_LICENSES").write_text("pydicom: MIT\n", encoding="utf-8")
    path, missing = _load().build_deb(bundle, tmp / "out", version="0.1.0~test", compression="gzip")
    assert missing == []
    root = tmp / "root"
    subprocess.run(["dpkg-deb", "-x", str(path), str(root)], check=True)
    subprocess.run(["dpkg-deb", "-e", str(path), str(root / "DEBIAN")], check=True)
    return path, root


def test_layout_and_control(deb: tuple[Path, Path]) -> None:
    path, root = deb
    assert path.name.startswith("cxrviewer_0.1.0~test_") and path.suffix == ".deb"
    for rel in ("opt/cxrviewer/cxrviewer", "opt/cxrviewer/_internal/data.txt", "opt/cxrviewer/THIRD_PARTY_LICENSES",
                "usr/share/applications/cxrviewer.desktop", "usr/share/mime/packages/cxrviewer.xml",
                "usr/share/icons/hicolor/256x256/apps/cxrviewer.png",
                "usr/share/icons/hicolor/scalable/apps/cxrviewer.svg", "usr/share/doc/cxrviewer/copyright"):
        assert (root / rel).is_file(), rel
    launcher = root / "usr/bin/cxrviewer"
    assert launcher.stat().st_mode & 0o111 and "exec /opt/cxrviewer/cxrviewer \"$@\"" in launcher.read_text()
    assert (root / "opt/cxrviewer/cxrviewer").stat().st_mode & 0o111
    assert (root / "usr/share/icons/hicolor/256x256/apps/cxrviewer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fields = dict(line.split(": ", 1) for line in (root / "DEBIAN/control").read_text().splitlines()
                  if ": " in line and not line.startswith(" "))
    assert fields["Package"] == "cxrviewer" and fields["Version"] == "0.1.0~test"
    assert int(fields["Installed-Size"]) >= 1 and "Depends" not in fields  # no ELF file in the stand-in
    listing = subprocess.run(["dpkg-deb", "-c", str(path)], capture_output=True, text=True, check=True).stdout
    assert "root/root" in listing and "./opt/cxrviewer/cxrviewer" in listing


def test_desktop_entry_and_mime_types(deb: tuple[Path, Path]) -> None:
    _path, root = deb
    desktop = root / "usr/share/applications/cxrviewer.desktop"
    text = desktop.read_text(encoding="utf-8")
    assert "Exec=cxrviewer %F" in text and "Icon=cxrviewer" in text
    assert "MimeType=application/dicom;application/x-cxrviewer-project;" in text
    if shutil.which("desktop-file-validate"):
        res = subprocess.run(["desktop-file-validate", str(desktop)], capture_output=True, text=True)
        assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr  # no error, warning or hint
    ns = {"m": "http://www.freedesktop.org/standards/shared-mime-info"}
    tree = ET.parse(root / "usr/share/mime/packages/cxrviewer.xml")
    types = {t.get("type"): t for t in tree.getroot().findall("m:mime-type", ns)}
    assert set(types) == {"application/dicom", "application/x-cxrviewer-project"}
    assert types["application/x-cxrviewer-project"].find("m:glob", ns).get("pattern") == "*.cxrann"
    match = types["application/dicom"].find("m:magic/m:match", ns)
    assert (match.get("offset"), match.get("value")) == ("128", "DICM")


def test_maintainer_scripts_leave_homes_alone(deb: tuple[Path, Path]) -> None:
    _path, root = deb
    for name in ("postinst", "postrm"):
        script = root / "DEBIAN" / name
        text = script.read_text(encoding="utf-8")
        assert script.stat().st_mode & 0o111 and text.startswith("#!/bin/sh")
        assert "HOME" not in text and "~" not in text and "/home" not in text and "rm " not in text
        assert "update-mime-database" in text and "command -v" in text
        subprocess.run(["sh", "-n", str(script)], check=True)  # syntax


def test_not_a_bundle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a cxrviewer onedir bundle"):
        _load().build_deb(tmp_path, tmp_path / "out")
