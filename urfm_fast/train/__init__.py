"""The trainer and its parts: the run's config and checks, the frozen plan, parallelisation (AC ->
compile -> FSDP2/DDP), process groups, checkpointing, metrics, fault handling, EMA, schedules."""
