"""Downstream evaluation's parts: labelled data (data; UltraBench folders, image/mask pairs and synthetic masks
in seg_data), the backbones compared (backbones), the classification protocols (protocols) and the
segmentation protocols and metrics (segmentation). The command is urfm_fast.evaluate."""
