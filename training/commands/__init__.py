"""``cxr-train`` sub-commands, one module each (``add_arguments``, ``run``)."""
