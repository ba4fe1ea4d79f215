"""Trainers: one shared loop (:mod:`training.trainers.loop`), one module per method."""
