"""Training package: phantoms, datasets, losses and trainers that write model bundles.

Imports ``cxrviewer.core`` only, never Qt (import-linter contract).
"""
