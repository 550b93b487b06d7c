"""URFM: a masked ViT student that predicts a frozen teacher's patch features.

Layout and state-dict keys are those of MAE's ``MaskedAutoencoderViT`` built with timm blocks:
the encoder (``cls_token``, ``pos_embed``, ``patch_embed``, ``blocks``, ``norm``) sits at the top
level exactly as in timm's ViT, and the MIM-only parts carry MAE's ``decoder*``/``mask_token`` names.
So the released ``mae_vit_*_patch16_dec768d8b_*.pth`` files load strictly, and dropping the decoder
keys leaves a timm ``vit_*_patch16_224`` state dict.

Per step (B images, N patches, K visible, T target width):
    patches -> gather K visible (+pos, +CLS) -> encoder blocks -> norm
    -> decoder_embed -> un-shuffle with mask_token (+decoder pos) -> decoder blocks -> decoder_norm
    -> gather the N-K masked positions -> decoder_pred -> 1 - cos(pred, teacher target)

MILAN's switches (``URFMConfig``): ``mask_type='attention'`` keeps the patches the teacher's CLS attends
to (sampled, see masking.attention_masking); ``decoder='prompting'`` updates only the mask tokens, the
encoder's tokens serving as fixed keys/values (same parameters and keys as the standard decoder, so
either loads the other's checkpoints); ``loss_on='all_cls'`` adds the CLS row against the teacher's CLS.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from urfm_fast.config import URFMConfig
from urfm_fast.model import ops
from urfm_fast.model.masking import attention_masking, block_masking, random_masking, split_ids
from urfm_fast.model.vit import Block, ViTEncoder, sincos_pos_embed_2d

DECODER_PREFIXES = ("decoder_", "mask_token")


class URFM(ViTEncoder):
    def __init__(self, cfg: URFMConfig | None = None):
        cfg = cfg or URFMConfig()
        super().__init__(
            cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio
        )
        self.cfg = cfg
        n = cfg.num_patches
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + n, cfg.decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.target_dim)
        self.pos_embed.requires_grad_(False)  # fixed sin-cos, as in MAE
        self.init_weights()

    def init_weights(self) -> None:
        """MAE's initialisation: sin-cos position embeddings, xavier linears, N(0, 0.02) tokens."""
        cfg = self.cfg
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(cfg.embed_dim, cfg.grid_size)[None])
            self.decoder_pos_embed.copy_(sincos_pos_embed_2d(cfg.decoder_embed_dim, cfg.grid_size)[None])
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.cls_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- masking -------------------------------------------------------------------------------
    def sample_ids(self, batch: int, device=None, generator=None, noise=None, keep_prob=None,
                   num_visible: int | None = None) -> torch.Tensor:
        """ids_shuffle [B,N] from the configured generator; the first ``num_visible`` (default
        ``cfg.num_visible``) are visible. ``mask_type='attention'`` needs ``keep_prob`` [B,N], the teacher's
        attention (``Targets.saliency``)."""
        cfg = self.cfg
        if cfg.mask_type == "attention":
            if keep_prob is None:
                raise ValueError("mask_type='attention' needs keep_prob: the teacher's saliency (saliency=True)")
            return attention_masking(keep_prob.to(device), generator, noise)
        if cfg.mask_type == "block" and noise is None:
            k = cfg.num_visible if num_visible is None else num_visible
            return block_masking(batch, cfg.grid_size, cfg.num_patches - k, device, generator)
        return random_masking(batch, cfg.num_patches, device, generator, noise)

    # -- the two halves --------------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """imgs [B,3,H,W] normalised, ids_keep [B,K] -> encoder tokens [B,1+K,D] (CLS first)."""
        x = self.patch_embed(imgs)  # (B, N, D)
        x = ops.gather_visible(x, ids_keep, self.pos_embed[0], self.cls_token.view(-1))  # (B, 1+K, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                        ids_shuffle: torch.Tensor | None = None) -> torch.Tensor:
        """latent [B,1+K,D] -> decoder tokens [B,1+N,Dd] in image order, after decoder_norm."""
        x = self.decoder_embed(latent)  # (B, 1+K, Dd)
        x = ops.unshuffle(x, self.mask_token.view(-1), ids_restore, self.decoder_pos_embed[0])  # (B, 1+N, Dd)
        if self.cfg.decoder == "prompting":
            return self.decoder_norm(self._prompted(x, ids_restore, ids_shuffle, latent.shape[1] - 1))
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)

    def _prompted(self, x: torch.Tensor, ids_restore: torch.Tensor, ids_shuffle: torch.Tensor | None,
                  num_visible: int) -> torch.Tensor:
        """MILAN's prompting decoder on x [B,1+N,Dd] (image order): CLS and the K visible tokens are fixed
        prompts, only the N-K mask tokens pass through the blocks. -> [B,1+N,Dd] in image order."""
        if ids_shuffle is None:
            ids_shuffle = torch.argsort(ids_restore, dim=1)
        shuffled = ops.gather_tokens(x, ids_shuffle + 1)  # (B, N, Dd): visible first, then masked
        prompts = torch.cat([x[:, :1], shuffled[:, :num_visible]], dim=1)  # (B, 1+K, Dd)
        queries = shuffled[:, num_visible:]  # (B, N-K, Dd)
        for blk in self.decoder_blocks:
            queries = blk(queries, prompts=prompts)
        patches = ops.gather_tokens(torch.cat([prompts[:, 1:], queries], dim=1), ids_restore)  # (B, N, Dd)
        return torch.cat([prompts[:, :1], patches], dim=1)

    def forward(
        self,
        imgs: torch.Tensor,
        target: torch.Tensor,
        ids_shuffle: torch.Tensor | None = None,
        cls_target: torch.Tensor | None = None,
        num_visible: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [B,3,H,W] (ImageNet-normalised), target [B,N,T] teacher patch features (or normalised pixels,
        ``loss='mse'``), ``cls_target`` [B,T] the teacher's CLS (``loss_on='all_cls'`` only), ``num_visible``
        this step's visible count K (a mask schedule; default ``cfg.num_visible``). Where K is N (nothing
        masked), ``loss_on='masked'`` takes every patch: feature distillation.

        Returns ``(loss, pred, ids_shuffle)``: the fp32 scalar loss, the predictions it was computed on
        ([B, N-K, T] at the masked positions in ``ids_shuffle[:, K:]`` order; [B, N, T] in image order with
        ``loss_on='all'``; [B, 1+N, T], CLS first, with ``'all_cls'``), and the masking used.
        """
        cfg = self.cfg
        B = imgs.shape[0]
        if target.shape[:2] != (B, cfg.num_patches) or target.shape[2] != cfg.target_dim:
            raise ValueError(f"target shape {tuple(target.shape)} != {(B, cfg.num_patches, cfg.target_dim)}")
        if cfg.loss_on == "all_cls" and (cls_target is None or cls_target.shape != (B, cfg.target_dim)):
            got = None if cls_target is None else tuple(cls_target.shape)
            raise ValueError(f"loss_on='all_cls' needs cls_target of shape {(B, cfg.target_dim)}, got {got}")
        if ids_shuffle is None:
            ids_shuffle = self.sample_ids(B, imgs.device)
        k = cfg.num_visible if num_visible is None else num_visible
        ids_keep, ids_mask, ids_restore = split_ids(ids_shuffle, k)
        latent = self.forward_encoder(imgs, ids_keep)
        x = self.forward_decoder(latent, ids_restore, ids_shuffle)  # (B, 1+N, Dd)
        if cfg.loss_on == "masked" and k < cfg.num_patches:
            # +1 skips the CLS row; predicting only the masked rows saves a quarter of decoder_pred.
            x = ops.gather_tokens(x, ids_mask + 1)  # (B, N-K, Dd)
            target = ops.gather_tokens(target, ids_mask)  # (B, N-K, T)
        elif cfg.loss_on in ("all", "masked"):
            x = x[:, 1:]
        else:  # all_cls: MILAN's loss over all 1+N rows, CLS against the teacher's CLS
            target = torch.cat([cls_target[:, None].to(target.dtype), target], dim=1)  # (B, 1+N, T)
        pred = self.decoder_pred(x)  # (B, M, T)
        if cfg.loss == "mse":  # MAE: mean squared error per element, over the rows in the loss
            return torch.nn.functional.mse_loss(pred.float(), target.float()), pred, ids_shuffle
        loss = ops.cosine_loss(pred.flatten(0, 1), target.flatten(0, 1), target_norm=cfg.target_norm)
        return loss, pred, ids_shuffle

    # -- parameter groups ------------------------------------------------------------------------
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone alone, timm ViT keys (what export writes)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(DECODER_PREFIXES)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """MAE's AdamW groups: no decay on biases, norms, position embeddings, CLS and mask tokens."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name.endswith((".bias", "pos_embed", "cls_token", "mask_token")):
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
