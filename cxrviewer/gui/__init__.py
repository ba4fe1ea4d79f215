"""Qt desktop: the only package that imports PySide6 / pyqtgraph."""
from . import _pyside_fix

_pyside_fix.apply()  # PySide6 6.12 Signal.emit() refcount bug on Py_True (see the module)
