"""Generate THIRD_PARTY_LICENSES from what a built cxrviewer bundle actually contains.

    python packaging/licenses.py dist/cpu/cxrviewer [--binaries build/pyi-cpu/binaries.json]
                                 [--out packaging/THIRD_PARTY_LICENSES] [--json report.json]

Sources, all read from the bundle (not from the build venv):

* every ``*.dist-info`` folder in the bundle (the spec copies one for each
  distribution whose files were collected): ``License-Expression``, ``License``
  and ``License ::`` classifiers, and the licence files in the folder;
* the shared libraries that PyInstaller's dependency analysis took from the
  system (``binaries.json``, written by the spec): their Debian package and its
  ``/usr/share/doc/<package>/copyright`` (Linux), or a table of known libraries;
* the Python runtime's own licence and PyInstaller's bootloader.

Policy: GPL or AGPL code (without a linking exception, and not offered under a
permissive alternative) fails the build (exit status 1). LGPL is allowed for
dynamically linked libraries and listed with a note: PySide6/shiboken6 and the Qt
libraries are LGPL-3.0 and stay separate, replaceable shared libraries in the
onedir bundle (``_internal/PySide6``), which is what the LGPL asks for. GCC's runtime
libraries (GPL-3.0 with the GCC Runtime Library Exception) and the PyInstaller
bootloader (GPL-2.0 with its bootloader exception) are allowed by their exceptions.
"""
from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LICENSE_NAME = re.compile(r"(LICEN[CS]E|COPYING|NOTICE|COPYRIGHT|AUTHORS)", re.I)
#: System libraries whose licence is known without a package database (soname prefix -> licence).
KNOWN_LIBS = {
    "libgcc_s": "GPL-3.0-or-later WITH GCC-exception-3.1",
    "libgomp": "GPL-3.0-or-later WITH GCC-exception-3.1",
    "libgfortran": "GPL-3.0-or-later WITH GCC-exception-3.1",
    "libquadmath": "LGPL-2.1-or-later",
    "libstdc++": "GPL-3.0-or-later WITH GCC-exception-3.1",
    "libpython": "PSF-2.0",
    "libreadline": "GPL-3.0-or-later",
    "libhistory": "GPL-3.0-or-later",
    "libffi": "MIT",
    "libz": "Zlib",
    "libbz2": "bzip2-1.0.6",
    "liblzma": "0BSD",
    "libssl": "Apache-2.0",
    "libcrypto": "Apache-2.0",
    "libsqlite3": "blessing",
    "libuuid": "BSD-3-Clause",
    "libexpat": "MIT",
    "libmpdec": "BSD-2-Clause",
    "libncursesw": "MIT",
    "libtinfo": "MIT",
    # Libraries from multi-licence Debian source packages whose "Files: *" stanza names the
    # tools' licence (e.g. util-linux's GPL) rather than the library's:
    "libblkid": "LGPL-2.1-or-later",
    "libmount": "LGPL-2.1-or-later",
    "libkeyutils": "LGPL-2.0-or-later",
    "libcom_err": "MIT",
    "libsystemd": "LGPL-2.1-or-later",
    "libgcrypt": "LGPL-2.1-or-later",
    "libgpg-error": "LGPL-2.1-or-later",
    "libselinux": "LicenseRef-public-domain",
    "libkrb5": "MIT",
    "libk5crypto": "MIT",
    "libgssapi_krb5": "MIT",
    "libX": "MIT",
    "libxcb": "MIT",
    "libxkbcommon": "MIT",
    "libfontconfig": "MIT",
    "libfreetype": "FTL OR GPL-2.0-or-later",
    "libjpeg": "IJG AND BSD-3-Clause AND Zlib",
    "libglib": "LGPL-2.1-or-later",
    "libgio": "LGPL-2.1-or-later",
    "libgobject": "LGPL-2.1-or-later",
    "libgmodule": "LGPL-2.1-or-later",
    "libgthread": "LGPL-2.1-or-later",
    "libdbus": "AFL-2.1 OR GPL-2.0-or-later",
    "libpng": "Libpng",
    "libpcre2": "BSD-3-Clause",
}
#: Distributions whose licence needs a sentence in the notices.
NOTES = {
    "pyside6-essentials": "LGPL-3.0 (chosen among LGPL-3.0/GPL-2.0/GPL-3.0): Qt and PySide6 are dynamically "
                          "linked shared libraries kept as separate files in _internal/PySide6 and may be "
                          "replaced by the user with a compatible build; the source is at "
                          "https://code.qt.io/cgit/pyside/pyside-setup.git and https://code.qt.io.",
    "shiboken6": "LGPL-3.0, dynamically linked (see PySide6 above).",
    "pyinstaller": "GPL-2.0-or-later with the PyInstaller bootloader exception: the bootloader and the "
                   "run-time modules it adds may be distributed with applications under any licence.",
}


@dataclass
class Component:
    name: str
    version: str
    licence: str
    source: str
    category: str = "permissive"
    note: str = ""
    files: list[tuple[str, str]] = field(default_factory=list)  # (label, text)


# --------------------------------------------------------------------------- classification
def _spdx_alternatives(expr: str) -> list[str]:
    """Top-level OR alternatives of a licence expression (parentheses kept together)."""
    parts, depth, cur = [], 0, ""
    tokens = re.split(r"(\(|\)|\s+OR\s+|\s+or\s+)", expr)
    for t in tokens:
        if t == "(":
            depth += 1
        elif t == ")":
            depth -= 1
        if depth == 0 and t and t.strip().upper() == "OR":
            parts.append(cur)
            cur = ""
        else:
            cur += t or ""
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _is_strong_gpl(text: str) -> bool:
    """GPL/AGPL without an exception (LGPL excluded)."""
    t = text.upper().replace("GNU GENERAL PUBLIC LICENSE", "GPL").replace("GNU AFFERO", "AGPL")
    t = t.replace("LESSER GENERAL PUBLIC", "LGPL").replace("LIBRARY GENERAL PUBLIC", "LGPL")
    if "EXCEPTION" in t:
        return False
    return bool(re.search(r"(?<!L)\bA?GPL", t.replace("LGPL", "")))


def classify(licence: str) -> str:
    """``gpl`` (fails the build), ``lgpl``, ``exception``, ``unknown`` or ``permissive``."""
    if not licence.strip():
        return "unknown"
    alts = _spdx_alternatives(licence)
    cats = []
    for alt in alts:
        u = alt.upper()
        if "EXCEPTION" in u and "GPL" in u:
            cats.append("exception")
        elif "LGPL" in u or "LESSER GENERAL" in u or "LIBRARY GENERAL" in u:
            cats.append("lgpl")
        elif _is_strong_gpl(alt):
            cats.append("gpl")
        else:
            cats.append("permissive")
    # The most permissive alternative wins (a choice offered by the licensors).
    for c in ("permissive", "exception", "lgpl", "gpl"):
        if c in cats:
            return c
    return "unknown"


# --------------------------------------------------------------------------- readers
def _read(path: Path, limit: int = 400_000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[:limit]
    except OSError as exc:
        return f"(unreadable: {exc})"


def dist_component(info: Path) -> Component:
    """A component from a ``.dist-info`` folder."""
    meta = email.parser.Parser().parsestr(_read(info / "METADATA"), headersonly=True)
    name = meta.get("Name") or info.name.split("-")[0]
    version = meta.get("Version") or "?"
    expr = (meta.get("License-Expression") or "").strip()
    lic = (meta.get("License") or "").strip()
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                   if c.startswith("License ::") and "OSI Approved" != c.split("::")[-1].strip()]
    if expr:
        licence = expr
    elif lic and len(lic) < 120 and "\n" not in lic and not lic.lower().startswith(("copyright", "files:")):
        licence = lic
    elif classifiers:
        licence = " OR ".join(classifiers)
    else:
        licence = lic.splitlines()[0][:120] if lic else ""
    comp = Component(name, version, licence, f"{info.name} (Python distribution)")
    comp.category = classify(licence)
    key = name.lower().replace("_", "-")
    if key in NOTES:
        comp.note = NOTES[key]
        if key in ("pyside6-essentials", "shiboken6"):
            comp.category = "lgpl"
        if key == "pyinstaller":
            comp.category = "exception"
    for f in sorted(info.rglob("*")):
        if f.is_file() and LICENSE_NAME.search(f.name):
            comp.files.append((str(f.relative_to(info)), _read(f)))
    if not comp.files and lic and len(lic) >= 120:
        comp.files.append(("METADATA License field", lic))
    return comp


def _dpkg_owner(path: str) -> str | None:
    if not shutil.which("dpkg"):
        return None
    for cand in (path, os.path.realpath(path)):
        try:
            out = subprocess.run(["dpkg", "-S", cand], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0 and ":" in out.stdout:
            return out.stdout.split(":")[0].strip()
    return None


def _dep5_main_licence(text: str) -> str:
    """The ``License:`` of the ``Files: *`` stanza of a machine-readable Debian copyright file."""
    for stanza in re.split(r"\n\s*\n", text):
        if re.search(r"^Files:\s*\*\s*$", stanza, re.M):
            m = re.search(r"^License:\s*(.+)$", stanza, re.M)
            if m:
                return m.group(1).strip()
    return ""


def binary_components(binaries: list[list[str]], owned: set[str]) -> list[Component]:
    """Components for shared libraries not owned by a bundled Python distribution."""
    by_pkg: dict[str, Component] = {}
    libs: dict[str, set[str]] = {}
    for dest, src in sorted(binaries):  # the same notice file from one build to the next
        if not src or os.path.realpath(src) in owned or "site-packages" in src.replace("\\", "/"):
            continue
        base = os.path.basename(dest)
        if base.endswith((".pyd",)) or "lib-dynload" in src.replace("\\", "/"):
            continue  # CPython extension modules: covered by the Python licence
        known = next((lic for pre, lic in KNOWN_LIBS.items() if base.startswith(pre)), None)
        pkg = _dpkg_owner(src)
        key = pkg or base
        comp = by_pkg.get(key)
        if comp is None:
            text, licence = "", known or ""
            if pkg:
                cfile = Path("/usr/share/doc") / pkg.split(":")[0] / "copyright"
                if cfile.is_file():
                    text = _read(cfile)
                    licence = known or _dep5_main_licence(text) or "see copyright file"
            comp = Component(pkg or base, "", licence, f"system library ({'Debian package ' + pkg if pkg else src})")
            comp.category = classify(licence) if licence and licence != "see copyright file" else "review"
            if text:
                comp.files.append((f"/usr/share/doc/{pkg.split(':')[0]}/copyright", text))
            by_pkg[key] = comp
        libs.setdefault(key, set()).add(base)
    for key, comp in by_pkg.items():  # library names sorted: the notice file does not change between builds
        comp.source += "".join(f"; {b}" for b in sorted(libs[key]))
    return list(by_pkg.values())


def python_component() -> Component:
    base = Path(sys.base_prefix)
    cands = [base / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt",
             base / "LICENSE.txt"]
    comp = Component("Python", sys.version.split()[0], "PSF-2.0", "the Python runtime (libpython, standard library)")
    for c in cands:
        if c.is_file():
            comp.files.append((str(c.name), _read(c)))
            break
    return comp


# --------------------------------------------------------------------------- driver
def collect(bundle: Path, binaries_json: Path | None) -> list[Component]:
    internal = bundle / "_internal" if (bundle / "_internal").is_dir() else bundle
    comps = [dist_component(d) for d in sorted(internal.glob("*.dist-info"))]
    comps.append(python_component())
    if binaries_json and binaries_json.is_file():
        data = json.loads(binaries_json.read_text(encoding="utf-8"))
        comps += binary_components(data.get("binaries", []), set())
    return comps


def render(comps: list[Component], title: str) -> str:
    lines = [f"Third-party software in {title}", "=" * 72, "",
             "cxrviewer itself is BSD-3-Clause. This file is generated by packaging/licenses.py from",
             "the files the bundle contains; do not edit it by hand.", "",
             "LGPL components (PySide6, shiboken6, Qt) are dynamically linked shared libraries kept",
             "as separate, replaceable files; no GPL/AGPL-only code is bundled (the generator fails",
             "the build otherwise).", "",
             f"{'component':32} {'version':14} {'category':11} licence"]
    lines.append("-" * 100)
    for c in sorted(comps, key=lambda c: c.name.lower()):
        lines.append(f"{c.name[:32]:32} {c.version[:14]:14} {c.category:11} {c.licence[:160]}")
    lines.append("")
    seen: dict[str, str] = {}
    for c in sorted(comps, key=lambda c: c.name.lower()):
        lines += ["", "=" * 72, f"{c.name} {c.version}".strip(), f"Licence: {c.licence or '(not declared)'}",
                  f"Source: {c.source}"]
        if c.note:
            lines.append(f"Note: {c.note}")
        if c.category == "lgpl":
            for p in (Path("/usr/share/common-licenses/LGPL-3"), Path("/usr/share/common-licenses/GPL-3")):
                if p.is_file() and str(p) not in seen:
                    c.files.append((str(p), _read(p)))
        for label, text in c.files:
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                lines += ["", f"--- {label}: same text as {seen[digest]}"]
                continue
            seen[digest] = f"{c.name} {label}"
            lines += ["", f"--- {label}", text.rstrip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", help="the built onedir folder, e.g. dist/cpu/cxrviewer")
    p.add_argument("--binaries", default=None, help="binaries.json written by the spec in the work path")
    p.add_argument("--out", default=None, help="write the notices here (default BUNDLE/THIRD_PARTY_LICENSES)")
    p.add_argument("--json", default=None, help="also write a JSON summary here")
    p.add_argument("--title", default="the cxrviewer application bundle")
    args = p.parse_args(argv)
    bundle = Path(args.bundle)
    if not bundle.is_dir():
        print(f"licenses: {bundle} is not a folder", file=sys.stderr)
        return 2
    comps = collect(bundle, Path(args.binaries) if args.binaries else None)
    out = Path(args.out) if args.out else bundle / "THIRD_PARTY_LICENSES"
    out.write_text(render(comps, args.title), encoding="utf-8")
    bad = [c for c in comps if c.category == "gpl"]
    review = [c for c in comps if c.category in ("unknown", "review")]
    summary = {"components": len(comps), "gpl": [f"{c.name} ({c.licence})" for c in bad],
               "lgpl": [c.name for c in comps if c.category == "lgpl"],
               "review": [f"{c.name} ({c.licence or 'undeclared'})" for c in review],
               "out": str(out), "bytes": out.stat().st_size}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    if bad:
        print("licenses: GPL/AGPL code in the bundle: " + "; ".join(summary["gpl"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
