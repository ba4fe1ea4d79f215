"""Small widgets: the study list and the message log."""
