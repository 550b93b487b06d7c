"""Downstream evaluation: its config (config: EvalConfig, the flags, the CPU sizing), the driver (run), what it
reports (report), labelled data (data; UltraBench folders, image/mask pairs and synthetic masks in seg_data),
the backbones compared (backbones), the classification protocols (protocols; the attentive probe in
attentive) and the segmentation protocols and metrics (segmentation). The command urfm_fast.evaluate parses
the flags and calls run.evaluate."""
