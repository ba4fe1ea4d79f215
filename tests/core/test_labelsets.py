"""Label sets as data: matching by spelling and synonyms, mapping between sets, user files."""
from __future__ import annotations

import json

import pytest

from cxrviewer.core.errors import CxrError, LabelSetError, UnmappedLabelsError
from cxrviewer.core.labelsets import (BUILTIN, NIH14, TORCHXRAYVISION18, VINDR_CXR, LabelSet, extended,
                                      get_label_set, guess_label_set, label_set_from_json, load_label_set,
                                      map_names, normalise, parse_mapping, require_mapped)


def test_builtin_sets():
    assert NIH14.labels[0] == "Atelectasis" and len(NIH14) == 14
    assert len(TORCHXRAYVISION18) == 18 and "Lung Opacity" in TORCHXRAYVISION18.labels
    assert len(VINDR_CXR) == 14 and "Aortic enlargement" in VINDR_CXR.labels
    assert set(BUILTIN) >= {"nih14", "torchxrayvision18", "vindr-cxr", "rsna-pneumonia"}


@pytest.mark.parametrize("name,label", [("Infiltrate", "Infiltration"), ("infiltration", "Infiltration"),
                                        ("Pleural Thickening", "Pleural_Thickening"),
                                        ("pleural-thickening", "Pleural_Thickening"), ("MASS", "Mass"),
                                        ("Pleural effusion", "Effusion")])
def test_nih_spellings_and_synonyms(name, label):
    assert NIH14.canonical(name) == label and name in NIH14


def test_unknown_name():
    assert NIH14.canonical("Lung Opacity") is None and "Lung Opacity" not in NIH14
    with pytest.raises(KeyError):
        NIH14.index("Lung Opacity")
    assert normalise("  Pleural__Thickening ") == "pleural thickening"


def test_map_names_between_sets():
    mapping, unmapped = map_names(["Effusion", "Aortic enlargement", "mass"], VINDR_CXR)
    assert mapping == {"Effusion": "Pleural effusion", "Aortic enlargement": "Aortic enlargement"}
    assert unmapped == ["mass"]  # VinDr-CXR has "Nodule/Mass", not Mass
    mapping, unmapped = map_names(["Aortic enlargement", "Nodule/Mass", "Other lesion"], NIH14,
                                  {"Nodule/Mass": "Nodule"})
    assert mapping == {"Nodule/Mass": "Nodule"} and unmapped == ["Aortic enlargement", "Other lesion"]
    with pytest.raises(UnmappedLabelsError) as err:
        require_mapped(["Aortic enlargement", "Atelectasis"], NIH14, what="COCO categories")
    assert err.value.unmapped == ("Aortic enlargement",) and "--map" in str(err.value)
    assert "Aortic enlargement" in str(err.value) and isinstance(err.value, CxrError)
    with pytest.raises(LabelSetError):
        map_names(["A"], NIH14, {"A": "Not a class"})


def test_parse_mapping_and_extended():
    assert parse_mapping(["Nodule/Mass=Nodule", " ILD = Fibrosis "]) == {"Nodule/Mass": "Nodule", "ILD": "Fibrosis"}
    with pytest.raises(LabelSetError):
        parse_mapping(["novalue"])
    ext = extended(NIH14, ["Aortic enlargement", "Mass"])
    assert ext.labels[-1] == "Aortic enlargement" and len(ext) == 15 and ext.canonical("Infiltrate") == "Infiltration"


def test_user_files(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("# my labels\nTube\nLine\nETT = Tube\n")
    s = load_label_set(p)
    assert s.name == "mine" and s.labels == ("Tube", "Line") and s.canonical("ett") == "Tube"
    j = tmp_path / "set.json"
    j.write_text(json.dumps({"name": "devices", "labels": ["Tube", "Pacemaker"], "synonyms": {"PM": "Pacemaker"}}))
    s2 = get_label_set(str(j))
    assert s2.name == "devices" and s2.canonical("pm") == "Pacemaker"
    assert label_set_from_json(s2.to_json()) == s2 and label_set_from_json("nih14") is NIH14
    for bad in ('{"labels": "x"}', '[1, 2]', '{"labels": ["A", "a"]}', '{"labels": ["A"], "synonyms": {"B": "C"}}',
                "not json", '{"labels": []}'):
        j.write_text(bad)
        with pytest.raises(LabelSetError):
            load_label_set(j)
    with pytest.raises(LabelSetError):
        get_label_set("no-such-set")
    big = tmp_path / "big.txt"
    big.write_text("x" * (2 << 20))
    with pytest.raises(LabelSetError, match="larger"):
        load_label_set(big)


def test_guess():
    assert guess_label_set(["Mass", "Nodule"]) is NIH14
    assert guess_label_set(["Lung Opacity", "Mass"]) is TORCHXRAYVISION18
    assert guess_label_set(["Foo"]) is None
    assert isinstance(guess_label_set(["Lung Opacity"]), LabelSet)


def test_bundle_declares_its_label_set(tmp_path):
    """A bundle names the set its classes come from; without one, a classifier's are NIH-14."""
    import torch

    from cxrviewer.core.bundle import load_bundle, read_manifest, save_bundle
    from cxrviewer.core.errors import BundleError
    from cxrviewer.core.models import create_model

    torch.manual_seed(0)
    classes = list(TORCHXRAYVISION18.labels)
    model = create_model("cam_classifier", num_classes=18, backbone="tiny")
    p = save_bundle(model, tmp_path / "txv", classes=classes, input_size=64, label_set="torchxrayvision18")
    m = read_manifest(p)
    assert m.label_set == "torchxrayvision18" and m.labels is TORCHXRAYVISION18 and m.classes[16] == "Lung Opacity"
    assert load_bundle(p).manifest.classes == tuple(classes)
    with pytest.raises(BundleError, match="Lung Opacity"):
        save_bundle(model, tmp_path / "nih", classes=classes, input_size=64)  # NIH-14 by default
    custom = LabelSet("devices", tuple(f"D{i}" for i in range(18)))
    p2 = save_bundle(model, tmp_path / "dev", classes=list(custom.labels), input_size=64, label_set=custom)
    assert read_manifest(p2).labels == custom
