"""cxrviewer: chest X-ray explainability and annotation."""

__version__ = "0.1.0"
