"""Headless sub-commands of ``cxrviewer`` (one module each: ``add_arguments``, ``run``)."""
