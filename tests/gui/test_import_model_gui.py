"""Models > Import model…: the dialog's command line per format, a real import through the
QProcess child (``python -m cxrviewer import-model``), the refusal of a pickled checkpoint
without "Allow pickle", and Cancel killing the child (and its grandchild) with nothing written."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cxrviewer.gui.import_model_dialog import (ARCHS, FORMATS, ImportChoices, ImportModelDialog, bundle_target,
                                               error_line, import_arguments, name_problem, parse_classes)

CHILD_MS = 60000  # a generous bound for a child that imports torch on a loaded 2-core machine


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Data and settings in this test's own folders."""
    monkeypatch.setenv("CXRVIEWER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CXRVIEWER_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path


class _Payload:
    """Unpickling it runs ``os.system(command)``: the kind of code a pickled checkpoint can hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _pickled_checkpoint(path: Path, command: str) -> Path:
    """A torch checkpoint (zip) whose pickle calls ``os.system(command)`` when loaded."""
    torch = pytest.importorskip("torch")
    torch.save({"state_dict": _Payload(command)}, path)
    return path


def _fill(dlg: ImportModelDialog, ckpt: Path, fmt: str, *, arch: str = "", classes: str = "",
          name: str = "m", pickle_ok: bool = False) -> None:
    dlg.checkpoint.setText(str(ckpt))
    dlg.fmt.setCurrentIndex(dlg.fmt.findData(fmt))
    if arch:
        dlg.arch.setCurrentText(arch)
    dlg.classes.setPlainText(classes)
    dlg.name.setText(name)
    dlg.pickle.setChecked(pickle_ok)


def _finished(dlg: ImportModelDialog) -> bool:
    return dlg.job is not None and not dlg.job.running and dlg.busy.isHidden()


# ---- the command line ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, arch, expected_arch", [
    ("torchxrayvision", "resnet50", ["--arch", "resnet50"]),
    ("chexnet", "densenet121", []),  # DenseNet-121 only: no --arch
    ("torchvision", "efficientnet_b0", ["--arch", "efficientnet_b0"]),
    ("timm", "convnext_tiny", ["--arch", "convnext_tiny"]),
])
def test_import_arguments_per_format(fmt, arch, expected_arch):
    c = ImportChoices("/x/ck.pt", fmt, "/m/a/a.cxrbundle", arch=arch, classes=("Mass", "Lung Opacity"),
                      label_set="vindr-cxr", input_size=320, allow_pickle=True)
    assert import_arguments(c) == ["import-model", "/x/ck.pt", "--format", fmt, *expected_arch,
                                   "--label-set", "vindr-cxr", "--input-size", "320", "--allow-pickle",
                                   "--out", "/m/a/a.cxrbundle", "--classes", "Mass", "Lung Opacity"]
    bare = ImportChoices("/x/ck.pt", fmt, "/o.cxrbundle")
    assert import_arguments(bare) == ["import-model", "/x/ck.pt", "--format", fmt, "--out", "/o.cxrbundle"]


def test_import_arguments_parse_with_the_cli_parser():
    """What the dialog builds is what ``cxrviewer import-model`` reads."""
    import argparse

    from cxrviewer.cli.import_model import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = import_arguments(ImportChoices("ck.pt", "torchvision", "o.cxrbundle", arch="resnet18",
                                          classes=("Mass", "Lung Opacity"), label_set="f.json"))
    ns = p.parse_args(argv[1:])
    assert (ns.checkpoint, ns.fmt, ns.arch, ns.classes, ns.label_set, ns.out, ns.allow_pickle) == (
        "ck.pt", "torchvision", "resnet18", ["Mass", "Lung Opacity"], "f.json", "o.cxrbundle", False)


def test_helpers(tmp_path):
    assert parse_classes("Mass, Nodule\nLung Opacity,,\n  \n") == ["Mass", "Nodule", "Lung Opacity"]
    assert name_problem("", tmp_path) and name_problem("a/b", tmp_path) and name_problem("..", tmp_path)
    assert name_problem("my model-1.v2", tmp_path) == ""
    (tmp_path / "taken").mkdir()
    assert "exists" in name_problem("taken", tmp_path)
    assert bundle_target("m", tmp_path) == tmp_path / "m" / "m.cxrbundle"
    assert error_line("WARNING: x\nerror: ck.pt: holds pickled objects\n", 2) == "ck.pt: holds pickled objects"
    assert error_line("", 3) == "the import stopped with exit code 3"


def test_dialog_choices_to_argv(qtbot, dirs):
    ckpt = dirs / "ck.pth"
    ckpt.write_bytes(b"x")
    dlg = ImportModelDialog(models_dir=dirs / "models")
    qtbot.addWidget(dlg)
    assert not dlg.pickle.isChecked() and dlg.pickle_warning.isHidden()  # off by default, no warning
    assert not dlg.import_button.isEnabled()  # no checkpoint yet
    _fill(dlg, ckpt, "timm", arch="efficientnet_b0", classes="Mass,\nNodule", name="effnet")
    dlg.labels.setCurrentIndex(dlg.labels.findData("nih14"))
    dlg.input_size.setValue(256)
    assert dlg.import_button.isEnabled()
    assert import_arguments(dlg.choices()) == [
        "import-model", str(ckpt), "--format", "timm", "--arch", "efficientnet_b0", "--label-set", "nih14",
        "--input-size", "256", "--out", str(dirs / "models" / "effnet" / "effnet.cxrbundle"),
        "--classes", "Mass", "Nodule"]
    dlg.fmt.setCurrentIndex(dlg.fmt.findData("chexnet"))
    dlg.classes.setPlainText("")
    dlg.set_label_file(str(dirs / "labels.json"))
    dlg.pickle.setChecked(True)
    assert not dlg.arch.isEnabled() and [dlg.arch.itemText(i) for i in range(dlg.arch.count())] == list(
        ARCHS["chexnet"])
    assert not dlg.pickle_warning.isHidden() and "runs any code" in dlg.pickle_warning.text()
    assert import_arguments(dlg.choices()) == [
        "import-model", str(ckpt), "--format", "chexnet", "--label-set", str(dirs / "labels.json"),
        "--input-size", "256", "--allow-pickle", "--out", str(dirs / "models" / "effnet" / "effnet.cxrbundle")]
    assert set(FORMATS) == {dlg.fmt.itemData(i) for i in range(dlg.fmt.count())}
    (dirs / "models" / "effnet").mkdir(parents=True)  # the name is taken now
    dlg.name.setText("effnet ")
    assert not dlg.import_button.isEnabled() and "exists" in dlg.import_button.toolTip()


# ---- the child process ----------------------------------------------------------------------------
def test_real_torchvision_import_appears_in_the_models_list(qtbot, dirs):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from cxrviewer.gui.main_window import MainWindow

    torch.manual_seed(0)
    ckpt = dirs / "resnet18_3.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), ckpt)
    win = MainWindow()
    qtbot.addWidget(win)
    imported: list[str] = []
    win.model_picker.bundleImported.connect(imported.append)
    win.act_import_model.trigger()  # File > Models > Import model…
    dlg = win.model_picker.import_dialog
    assert dlg is not None and dlg.isVisible()
    _fill(dlg, ckpt, "torchvision", arch="resnet18", classes="Atelectasis, Cardiomegaly, Effusion",
          name="my-resnet")
    job = dlg.start_import()
    assert job is not None and job.arguments[:2] == ["-m", "cxrviewer"] and job.program == sys.executable
    assert not dlg.busy.isHidden() and dlg.cancel_button.text() == "Cancel import"
    qtbot.waitUntil(lambda: _finished(dlg), timeout=CHILD_MS)
    target = dirs / "data" / "models" / "my-resnet" / "my-resnet.cxrbundle"
    assert imported == [str(target)], dlg.status.text()
    assert (target / "manifest.json").is_file() and not dlg.isVisible()
    from cxrviewer.core.bundle import read_manifest
    from cxrviewer.core.checksum import sha256_file

    prov = read_manifest(target).provenance
    assert (prov["format"], prov["checkpoint"], prov["checkpoint_sha256"], prov["pickled_checkpoint"]) == (
        "torchvision", ckpt.name, sha256_file(ckpt), False)
    picker = win.model_picker
    assert picker.folder == str(target.parent)
    assert [b.name for b in picker.bundles] == ["my-resnet"] and not picker.bundles[0].error
    assert picker.bundles[0].classes == ("Atelectasis", "Cardiomegaly", "Effusion")
    assert picker.tree.currentItem() is picker.tree.topLevelItem(0)
    assert "Imported model my-resnet" in win.statusBar().currentMessage()


def test_pickled_checkpoint_without_allow_pickle_is_refused_in_one_line(qtbot, dirs):
    marker = dirs / "payload-ran"
    ckpt = _pickled_checkpoint(dirs / "legacy.pth", f"touch {marker}")
    dlg = ImportModelDialog(models_dir=dirs / "models")
    qtbot.addWidget(dlg)
    _fill(dlg, ckpt, "torchxrayvision", name="legacy")
    assert dlg.start_import() is not None
    qtbot.waitUntil(lambda: _finished(dlg), timeout=CHILD_MS)
    text = dlg.status.text()
    assert "--allow-pickle" in text and "\n" not in text and "pickled" in text
    assert not marker.exists()  # the payload never ran
    assert not (dirs / "models").exists()  # nothing written
    assert text.startswith("Import failed: ") and 'tick "Allow pickle"' in text
    assert dlg.import_button.isEnabled() and dlg.cancel_button.text() == "Cancel"


@pytest.mark.skipif(os.name != "posix", reason="the payload is a POSIX shell line")
def test_cancel_kills_the_child_and_its_grandchild_and_writes_nothing(qtbot, dirs):
    started, done = dirs / "started", dirs / "done"
    ckpt = _pickled_checkpoint(dirs / "slow.pth", f"touch {started}; sleep 3; touch {done}")
    dlg = ImportModelDialog(models_dir=dirs / "models")
    qtbot.addWidget(dlg)
    dlg.show()
    _fill(dlg, ckpt, "torchxrayvision", name="slow", pickle_ok=True)
    job = dlg.start_import()
    assert job is not None and "--allow-pickle" in job.arguments
    qtbot.waitUntil(started.exists, timeout=CHILD_MS)  # the unpickling grandchild is running the payload
    dlg.cancel_button.click()
    qtbot.waitUntil(lambda: _finished(dlg), timeout=10000)
    assert job.cancelled and "cancelled" in dlg.status.text()
    qtbot.wait(4000)  # the payload would have finished by now
    assert not done.exists()  # killed with its whole session
    assert not (dirs / "models").exists() and dlg.isVisible()


def test_child_program_in_a_checkout_and_in_a_frozen_app(monkeypatch, tmp_path):
    """``python -m cxrviewer import-model …`` from an install; the frozen app runs its own executable."""
    from cxrviewer.gui.finetune import cxrviewer_program
    from cxrviewer.gui.import_model_dialog import ImportJob

    monkeypatch.delattr(sys, "frozen", raising=False)
    assert cxrviewer_program() == (sys.executable, ["-m", "cxrviewer"])
    app = tmp_path / "cxrviewer"
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(app))
    assert cxrviewer_program() == (str(app), [])
    job = ImportJob(["import-model", "ck.pt", "--format", "chexnet", "--out", "o"], tmp_path / "o.cxrbundle")
    assert (job.program, job.arguments) == (str(app), ["import-model", "ck.pt", "--format", "chexnet", "--out", "o"])
