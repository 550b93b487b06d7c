"""Downstream evaluation's parts: labelled data (data), the backbones compared (backbones) and the
protocols (protocols). The command is urfm_fast.evaluate."""
