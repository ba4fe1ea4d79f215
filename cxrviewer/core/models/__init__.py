"""Every network from the five papers, plain torch, registered by name.

``create_model(name, **kwargs)`` builds one; ``list_models()`` lists them. The
family modules are imported explicitly below so registration happens (explicit
imports survive PyInstaller; package scanning does not).

Registered names (``backbone=`` picks resnet18/34/50, densenet121 or tiny):

=================  ============  =====================================================
name               family        paper
=================  ============  =====================================================
cam_classifier     classifier    M0 baseline CAM (baseline-cam-space-attention-gated)
space_attention    classifier    space attention (same paper, Sec. 3.2)
attention_gated    classifier    attention-gated units (same paper, Sec. 3.3)
dm                 classifier    M1 disease-mask attention (disease-masks Eq. 4-5)
msa                classifier    M2 ResNet-MSA (iterative-attention-mining Sec. 2.3)
lung_heart         classifier    M3 input attention + F_l = F_g * M_g (lung-heart Eq. 3)
alignment          alignment     affine alignment module (cia-net Eq. 1, disease-masks Eq. 6)
cia                cia           M4 CIA-Net (cia-net Eq. 3)
unet               segmentation  U-Net left lung / right lung / heart
imported_          classifier    a torchvision/timm network imported with
classifier                       ``cxrviewer import-model`` (models/imported.py)
=================  ============  =====================================================

Aliases: ``"resnet50"`` = cam_classifier on resnet50, ``"resnet50_msa"`` = msa on
resnet50, ``"densenet121_lung_heart"``, ``"tiny_cia"``, ...
"""
from __future__ import annotations

from cxrviewer.core.models.registry import (
    FAMILIES,
    ModelSpec,
    create_model,
    get_spec,
    list_models,
    register_model,
)
from cxrviewer.core.models.backbones import BACKBONES, Backbone, build_backbone

# Family modules: imported for their @register_model side effect (keep explicit).
from cxrviewer.core.models import classifier  # noqa: F401
from cxrviewer.core.models import attention  # noqa: F401
from cxrviewer.core.models import dm  # noqa: F401
from cxrviewer.core.models import msa  # noqa: F401
from cxrviewer.core.models import lung_heart  # noqa: F401
from cxrviewer.core.models import alignment  # noqa: F401
from cxrviewer.core.models import cia  # noqa: F401
from cxrviewer.core.models import unet  # noqa: F401
from cxrviewer.core.models import imported  # noqa: F401
from cxrviewer.core.models.unet import SEGMENTATION_CLASSES

__all__ = [
    "BACKBONES",
    "Backbone",
    "FAMILIES",
    "ModelSpec",
    "SEGMENTATION_CLASSES",
    "build_backbone",
    "create_model",
    "get_spec",
    "list_models",
    "register_model",
]
