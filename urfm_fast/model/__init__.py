"""The networks: the URFM pretraining model (urfm), its ViT (vit), the frozen teachers (teacher), masking,
the kernel dispatch (ops) with its start-up check (kernel_check), and FLOP counting (flops)."""
