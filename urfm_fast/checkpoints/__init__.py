"""Checkpoint files: the formats we read and write (formats), a training run's resumable checkpoints
(runs), loading without unpickling (safe_load), and the backbone loader with the timm registration."""
