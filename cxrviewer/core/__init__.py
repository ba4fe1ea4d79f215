"""Qt-free core of cxrviewer: study I/O, models, explanations, annotations.

Nothing under ``cxrviewer.core`` may import PySide6 or pyqtgraph; the rule is
checked by the import-linter contract in ``pyproject.toml``.
"""
