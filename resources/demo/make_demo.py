"""Write the demo studies: phantom chest radiographs as an NIH-style folder.

    .venv/bin/python resources/demo/make_demo.py

Four 1024 x 1024 8-bit PNG phantoms from ``training.phantoms.generate_phantom``
(fixed seeds and findings) under ``images/``, their labels in
``Data_Entry_2017_demo.csv`` and the boxes of the boxed findings in
``BBox_List_2017_demo.csv`` (NIH column layout, 1024 px frame), so the viewer
shows labels and ground-truth boxes. The real chest of the demo is the DICOM in
``resources/demo_dicom/`` (see its README.md).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

DEMO = [  # (seed, findings)
    (11, ["Nodule"]),
    (12, ["Cardiomegaly", "Effusion"]),
    (13, ["Mass", "Atelectasis"]),
    (14, []),
]


def main() -> None:
    from training.phantoms import generate_phantom

    out = Path(__file__).resolve().parent
    (out / "images").mkdir(exist_ok=True)
    entries, boxes = [], []
    for i, (seed, labels) in enumerate(DEMO):
        s = generate_phantom(np.random.default_rng(seed), size=1024, labels=labels, masks=False)
        name = f"phantom_{i:03d}.png"
        img = np.asarray(s.image)
        if img.dtype != np.uint8:
            img = (np.clip(img.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(img).save(out / "images" / name, optimize=True)
        entries.append([name, "|".join(s.labels) or "No Finding", 0, 9000 + i, 50, "M", "PA", 1024, 1024, 0.143, 0.143])
        boxes += [[name, b.label, b.x, b.y, b.w, b.h] for b in s.boxes]
    with open(out / "Data_Entry_2017_demo.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        w.writerows(entries)
    with open(out / "BBox_List_2017_demo.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        w.writerows([[r[0], r[1], *(f"{v:.1f}" for v in r[2:])] for r in boxes])


if __name__ == "__main__":
    main()
