"Converting DeepMind's released ReLICv2 checkpoints: the safe reader, the exact format, every shape, Haiku itself."
import io
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from relicv2.encoder import resnet, same_padding, torchvision_resnet
from relicv2.pretrained import (ConversionError, SafeUnpickler, convert_checkpoint, convert_params, load_converted,
                                read_checkpoint, save_converted, to_haiku, write_haiku_checkpoint)


def randomized(enc, seed=0):
    "Random batch-norm statistics and affine parameters too, so that every tensor of the encoder matters."
    g = torch.Generator().manual_seed(seed)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.num_batches_tracked.fill_(123)
    return enc.eval()


@pytest.mark.parametrize("arch,width,shortcut", [("resnet18", 0.125, "every_stage"), ("resnet18", 0.125, "when_needed"),
                                                 ("resnet50", 0.0625, "when_needed"), ("resnet101", 0.0625, "when_needed")])
@pytest.mark.parametrize("device_axis", [True, False])
def test_file_round_trip_is_exact(tmp_path, arch, width, shortcut, device_axis):
    ours = randomized(resnet(arch, width, padding="same", shortcut=shortcut))
    path = write_haiku_checkpoint(tmp_path / "ck.pkl", *to_haiku(ours), step=99, device_axis=device_axis)
    conv = convert_checkpoint(path)
    assert (conv.arch, conv.width, conv.shortcut, conv.step) == (arch, width, shortcut, 99)
    sd = ours.state_dict()
    assert list(conv.state_dict) == list(sd)
    assert all(torch.equal(conv.state_dict[k], v) for k, v in sd.items())
    x = torch.rand(2, 3, 36, 36)
    with torch.no_grad(): assert torch.equal(conv.encoder()(x), ours(x))


def test_written_file_is_the_released_format(tmp_path):
    "The bytes name Haiku's FlatMapping and dill's array constructor, and every array has the device axis."
    import pickletools
    path = write_haiku_checkpoint(tmp_path / "ck.pkl", *to_haiku(resnet("resnet18", 0.125)))
    data = path.read_bytes()
    assert data[:2] == b"\x80\x02"  # protocol 2
    names = {a for op, a, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert {"haiku._src.data_structures FlatMapping", "dill._dill _create_array"} <= names
    es = read_checkpoint(path)["experiment_state"]
    assert all(a.shape[0] == 1 for v in es["online_params"].values() for a in v.values())


def test_reader_refuses_code_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    class Payload:
        def __reduce__(self): return (__import__("os").system, (f"touch {marker}",))
    for payload in (Payload(), {"experiment_state": {"online_params": Payload(), "online_state": {}}}):
        (tmp_path / "evil.pkl").write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(ConversionError, match="refused posix.system"): read_checkpoint(tmp_path / "evil.pkl")
    for module, name in (("builtins", "eval"), ("torch", "load"), ("numpy", "load"), ("dill._dill", "_load_type")):
        with pytest.raises(pickle.UnpicklingError, match=f"refused {module}.{name}"):
            SafeUnpickler(io.BytesIO(f"c{module}\n{name}\n.".encode())).load()
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [(b"", "is not a complete pickle"), (b"hello", "is not a complete pickle"),
                                             (pickle.dumps([1, 2], protocol=2), "holds no experiment_state")])
def test_bad_files_are_one_error_naming_the_file(tmp_path, content, message):
    (tmp_path / "bad.pkl").write_bytes(content)
    with pytest.raises(ConversionError, match=message) as e: convert_checkpoint(tmp_path / "bad.pkl")
    assert "bad.pkl" in str(e.value)


def test_truncated_checkpoint_at_every_tenth(tmp_path):
    data = write_haiku_checkpoint(tmp_path / "ck.pkl", *to_haiku(resnet("resnet18", 0.0625))).read_bytes()
    for i in range(1, 10):
        (tmp_path / "cut.pkl").write_bytes(data[: len(data) * i // 10])
        with pytest.raises(ConversionError, match="cut.pkl"): convert_checkpoint(tmp_path / "cut.pkl")


def test_shape_and_name_checks():
    params, state = to_haiku(resnet("resnet50", 0.0625))
    key = "res_net50/~/block_group_2/~/block_1/~/conv_0"
    with pytest.raises(ConversionError, match="missing layer3.1.conv1.weight"):
        convert_params({k: v for k, v in params.items() if k != key}, state)
    with pytest.raises(ConversionError, match="layer3.1.conv1.weight is"):
        convert_params(dict(params, **{key: {"w": np.zeros((1, 1, 64, 5), np.float32)}}), state)
    with pytest.raises(ConversionError, match="not a module of a ResNet"):
        convert_params(dict(params, **{"res_net50/~/mystery": {"w": np.zeros(3)}}), state)
    with pytest.raises(ConversionError, match="unexpected state"):
        convert_params(params, dict(state, **{"res_net50/~/initial_batchnorm/~/other_ema": {"average": np.zeros(4)}}))
    with pytest.raises(ConversionError, match="no ResNets found"): convert_params({}, {})
    with pytest.raises(ConversionError, match="unknown ResNet"):
        convert_params({k: v for k, v in params.items() if "block_group_3/~/block_2" not in k}, state)
    lead = {k: {n: a[None] for n, a in v.items()} for k, v in params.items()}
    lead[key] = params[key]  # one array without the device axis the others have
    with pytest.raises(ConversionError, match="without the leading device axis"): convert_params(lead, state)


def test_heads_are_left_out_and_named():
    params, state = to_haiku(resnet("resnet18", 0.0625), prefix="res_net18/~/")
    params["projector/~/linear"] = {"w": np.zeros((32, 8), np.float32), "b": np.zeros(8, np.float32)}
    params["predictor/~/linear"] = {"w": np.zeros((8, 8), np.float32)}
    assert convert_params(params, state).left_out == ["predictor/~/linear", "projector/~/linear"]


def test_formats_and_loaders(tmp_path):
    r50 = randomized(resnet("resnet50", padding="same"))
    conv = convert_params(*to_haiku(r50))  # files are tested above at small widths; torchvision needs width 1
    assert conv.torchvision_ready and save_converted(conv, tmp_path / "r50.pt") == "torchvision"
    import torchvision
    tv = torchvision.models.resnet50()
    tv.fc = nn.Identity()
    tv.load_state_dict(torch.load(tmp_path / "r50.pt", weights_only=True), strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(): torch.testing.assert_close(same_padding(tv).eval()(r50.normalize(x)), r50(x))
    assert save_converted(conv, tmp_path / "r50_ours.pt", "relicv2") == "relicv2"
    with torch.no_grad(): assert torch.equal(load_converted(tmp_path / "r50_ours.pt")(x), r50(x))
    wide = convert_params(*to_haiku(resnet("resnet50", 2 / 64 * 4)))  # 2x-style: not torchvision's shape
    assert not wide.torchvision_ready
    with pytest.raises(ConversionError, match="torchvision has no resnet50 of width"): save_converted(wide, tmp_path / "w.pt", "torchvision")
    with pytest.raises(ValueError, match="format must be one of auto, torchvision, relicv2"): save_converted(wide, tmp_path / "w.pt", "onnx")


def test_torchvision_with_every_stage_shortcut():
    r18 = randomized(resnet("resnet18", 0.25, shortcut="every_stage", padding="same"))
    tv = torchvision_resnet("resnet18", 0.25, state_dict=r18.state_dict(), padding="same", shortcut="every_stage").eval()
    x = torch.rand(2, 3, 33, 33)
    with torch.no_grad(): torch.testing.assert_close(tv(r18.normalize(x)), r18(x))


def test_cli_one_line_errors(tmp_path):
    (tmp_path / "evil.pkl").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    for bad in ("evil.pkl", "missing.pkl"):
        r = subprocess.run([sys.executable, "-c", "import sys; from relicv2.cli import convert_main; sys.exit(convert_main())",
                            str(tmp_path / bad), str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("relicv2-convert: error:") and bad in r.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.pt").exists()


def _haiku():
    try:
        import dill, haiku, jax  # noqa: F401
        return True
    except ImportError: return False


@pytest.mark.skipif(not _haiku(), reason="jax, dm-haiku and dill are not installed (pip install -e '.[convert]')")
def test_haiku_resnet50_matches_jax(tmp_path):
    "Haiku's own ResNet-50, random parameters and averages, saved with dill as the released files; logits to 1e-4."
    import dill, haiku as hk, jax
    net = hk.without_apply_rng(hk.transform_with_state(lambda x, t: hk.nets.ResNet50(num_classes=7)(x, is_training=t)))
    params, state = net.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), True)
    rng = np.random.default_rng(1)
    def jitter(path, name, a):
        a = np.asarray(a)
        if a.ndim == 0 or (name == "w" and "logits" not in path): return a
        lo, hi = (0.5, 2.0) if "var_ema" in path else (0.5, 1.5) if name == "scale" else (-0.1, 0.1)
        return rng.uniform(lo, hi, a.shape).astype(a.dtype)
    params = {m: {n: jitter(m, n, a) for n, a in v.items()} for m, v in params.items()}
    state = {m: {n: jitter(m, n, a) for n, a in v.items()} for m, v in state.items()}
    for m in state: state[m]["average"] = state[m]["hidden"]
    with open(tmp_path / "r50.pkl", "wb") as f:
        lead = lambda t: hk.data_structures.to_haiku_dict({m: {n: np.asarray(a)[None] for n, a in v.items()} for m, v in t.items()})
        dill.dump({"experiment_state": {"online_params": lead(params), "online_state": lead(state)}, "step": 3,
                   "rng": jax.random.PRNGKey(2)}, f, protocol=2)
    conv = convert_checkpoint(tmp_path / "r50.pkl")
    assert conv.left_out == ["res_net50/~/logits"] and conv.step == 3
    w, b = (torch.from_numpy(np.asarray(params["res_net50/~/logits"][n])) for n in ("w", "b"))
    for px in (32, 33):  # even sizes pad asymmetrically, odd ones symmetrically
        x = torch.rand(2, 3, px, px, generator=torch.Generator().manual_seed(px))
        normed = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        ref = np.asarray(net.apply(params, state, normed.permute(0, 2, 3, 1).numpy(), False)[0])
        with torch.no_grad():
            ours = (conv.encoder()(x) @ w + b).numpy()
            theirs_tv = (conv.torchvision()(normed) @ w + b).numpy()
        scale = np.abs(ref).max()
        assert np.abs(ours - ref).max() / scale < 1e-4
        assert np.abs(theirs_tv - ref).max() / scale < 1e-4
