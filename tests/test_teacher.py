"""BiomedCLIP teacher: identical to open_clip's own TimmModel tower on the same (random) weights."""

import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.timm_model import TimmModel

from urfm_fast import ops
from urfm_fast.teacher import BiomedCLIPTeacher, TeacherUnavailable


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
    out = teacher(torch.rand(1, 3, 64, 64))  # pos-embed resampled from 14x14 to 4x4
    assert out.shape == (1, 16, 512) and torch.isfinite(out).all()


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


def test_pickled_objects_are_refused(tmp_path):
    import argparse  # any non-tensor global must be refused by weights_only loading

    path = tmp_path / "evil.bin"
    torch.save({"visual.head.proj.weight": torch.zeros(512, 768), "x": argparse.Namespace(a=1)}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        BiomedCLIPTeacher.load(path)
