"kNN against a brute-force numpy computation (ties included), the linear probe and bad input (relicv2.probes); feature extraction and evaluation (relicv2.evaluate); the official protocol on augmented crops (relicv2.official_eval)."
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from relicv2.config import preset
from relicv2.items import TensorImages
from relicv2.encoder import resnet
from relicv2.probes import extract_features
from relicv2.evaluate import evaluate, evaluate_from_config, format_table
from relicv2.probes import knn_classify, linear_probe

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Every tensor here is tiny: one thread avoids OpenMP waits that make small ops 10x slower on a shared CPU."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- kNN, by brute force

def knn_numpy(train, train_y, test, k, T, n_classes):
    "One test row at a time: cosine similarities, k nearest (ties: lower train index), exp(s/T) votes, classes ranked (ties: lower class)."
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    ranked = []
    for q in test:
        s = train @ q
        nn_idx = np.argsort(-s, kind="stable")[:k]
        w = np.exp((s[nn_idx] - s[nn_idx].max()) / T)
        votes = np.zeros(n_classes)
        np.add.at(votes, train_y[nn_idx], w)
        ranked.append(np.argsort(-votes, kind="stable")[:5])
    return np.stack(ranked)


def scores(ranked, y):
    return 100.0 * np.mean(ranked[:, 0] == y), 100.0 * np.mean((ranked == y[:, None]).any(1))


@pytest.mark.parametrize("k,T,C", [(1, 0.07, 3), (5, 0.07, 10), (20, 0.5, 7), (200, 0.07, 10), (300, 0.01, 4)])
def test_knn_matches_numpy_on_continuous_features(k, T, C):
    g = torch.Generator().manual_seed(k)
    train, test = torch.randn(300, 8, generator=g, dtype=torch.float64), torch.randn(50, 8, generator=g, dtype=torch.float64)
    train_y, test_y = torch.randint(0, C, (300,), generator=g), torch.randint(0, C, (50,), generator=g)
    r = knn_classify(train, train_y, test, test_y, k=k, temperature=T, n_classes=C, chunk=16)
    ranked = knn_numpy(train.numpy(), train_y.numpy(), test.numpy(), k, T, C)
    assert r["predictions"].tolist() == ranked[:, 0].tolist()
    assert (r["top1"], r["top5"]) == pytest.approx(scores(ranked, test_y.numpy()))


def test_knn_matches_numpy_with_many_exact_ties():
    "Unit vectors whose similarities are exact binary fractions: many equal similarities and equal vote totals."
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(4, dtype=torch.float64)
    train = eye.repeat(6, 1)  # 24 rows, each direction 6 times
    train_y = torch.randint(0, 5, (24,), generator=g)
    half = 0.5 * torch.tensor([[1, 1, 1, 1], [1, -1, 1, 1], [1, 1, -1, -1], [-1, 1, 1, -1]], dtype=torch.float64)
    test = torch.cat([eye, half])
    test_y = torch.randint(0, 5, (len(test),), generator=g)
    for k in range(1, 7):  # every chosen neighbour is at the row's best similarity: weights are exactly 1, totals are counts
        r = knn_classify(train, train_y, test, test_y, k=k, n_classes=5, chunk=3)
        ranked = knn_numpy(train.numpy(), train_y.numpy(), test.numpy(), k, 0.07, 5)
        assert r["predictions"].tolist() == ranked[:, 0].tolist(), k
        assert (r["top1"], r["top5"]) == pytest.approx(scores(ranked, test_y.numpy()))


def test_knn_tie_rules():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    # a tie between two equally similar neighbours for the last place: the lower training index is chosen
    assert knn_classify(x[[0, 2]], torch.tensor([7, 2]), x[:1], k=1)["predictions"].item() == 7
    # a tie between two classes' votes (one neighbour each, equal similarity): the lower class wins
    q = torch.tensor([[1.0, 1.0]])
    assert knn_classify(x[:2], torch.tensor([3, 1]), q, k=2)["predictions"].item() == 1
    assert knn_classify(x[:2], torch.tensor([1, 3]), q, k=2)["predictions"].item() == 1


def test_knn_weighted_vote_beats_majority_at_low_temperature():
    "One neighbour at cosine 1 against two at cosine 0.8: exp(0.2 / T) > 2 iff T < 0.2 / ln 2 = 0.2885."
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    y, q = torch.tensor([4, 2, 2]), torch.tensor([[1.0, 0.0]])
    assert knn_classify(train, y, q, k=3, temperature=0.28)["predictions"].item() == 4
    assert knn_classify(train, y, q, k=3, temperature=0.30)["predictions"].item() == 2
    assert knn_classify(train, y, q, k=1, temperature=100.0)["predictions"].item() == 4


def test_knn_top5_semantics():
    "Six equally near neighbours of classes 0..5: the vote ranks them 0, 1, ..., 5 (ties: lower class)."
    train, y = torch.tensor([[1.0, 0.0]]).repeat(6, 1), torch.arange(6)
    q = torch.tensor([[2.0, 0.0]]).repeat(6, 1)  # the scale of a feature does not matter
    r = knn_classify(train, y, q, torch.arange(6), k=6, n_classes=10)
    assert r["top1"] == pytest.approx(100 / 6) and r["top5"] == pytest.approx(500 / 6)  # label 5 is sixth
    # with fewer than 5 classes the top-5 is always right
    r = knn_classify(train[:3], y[:3], q[:3], torch.tensor([2, 2, 2]), k=1)
    assert (r["top1"], r["top5"]) == (0.0, 100.0)
    assert r["predictions"].dtype == torch.int64


def test_knn_chunking_invariance_and_no_labels():
    g = torch.Generator().manual_seed(1)
    train, test, y = torch.randn(200, 16, generator=g), torch.randn(37, 16, generator=g), torch.randint(0, 10, (200,), generator=g)
    ref = knn_classify(train, y, test, k=10)
    assert ref["top1"] is None and ref["top5"] is None and ref["predictions"].shape == (37,)
    for chunk in (1, 5, 36, 37, 4096):
        assert torch.equal(knn_classify(train, y, test, k=10, chunk=chunk)["predictions"], ref["predictions"])
    half = knn_classify(train.half(), y, test.bfloat16(), k=10)  # half-precision features are promoted
    assert (half["predictions"] == ref["predictions"]).float().mean() > 0.9


# ---------------------------------------------------------------- linear probe

def separable(n, C=10, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    scale = torch.logspace(-3, 2, D)  # dimensions on very different scales
    x = (torch.eye(C, D)[y] * 3 + 0.2 * torch.randn(n, D, generator=g)) * scale + 5
    return x, y


@pytest.mark.parametrize("batch_size,epochs", [(96, 10), (4096, 40)])  # a last partial batch; one batch larger than N
def test_linear_probe_reaches_100_on_separable_features(batch_size, epochs):
    (x, y), (tx, ty) = separable(400), separable(200, seed=1)
    r = linear_probe(x, y, tx, ty, epochs=epochs, batch_size=batch_size)
    assert (r["top1"], r["top5"], r["train_top1"]) == (100.0, 100.0, 100.0)
    assert isinstance(r["classifier"], nn.Linear) and r["classifier"].weight.shape == (10, 32)
    # the returned layer takes raw features (the standardisation is folded in)
    assert torch.equal(r["classifier"](tx).argmax(1), ty)


def test_linear_probe_standardised_is_invariant_to_feature_scale():
    g = torch.Generator().manual_seed(2)
    x, y, tx, ty = torch.randn(400, 8, generator=g), torch.randint(0, 3, (400,), generator=g), torch.randn(100, 8, generator=g), torch.randint(0, 3, (100,), generator=g)
    a, b = torch.logspace(-3, 3, 8), torch.randn(8, generator=g)
    r1 = linear_probe(x, y, tx, ty, epochs=5, batch_size=64)
    r2 = linear_probe(x * a + b, y, tx * a + b, ty, epochs=5, batch_size=64)
    assert r1["top1"] == r2["top1"] and r1["train_top1"] == r2["train_top1"]


def test_linear_probe_is_deterministic():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 8, generator=g), torch.randint(0, 4, (300,), generator=g)
    w = [linear_probe(x, y, epochs=3, batch_size=32, seed=s)["classifier"].weight for s in (0, 0, 1)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    r = linear_probe(x, y, epochs=3, batch_size=32)
    assert r["top1"] is None and r["top5"] is None and 0 <= r["train_top1"] <= 100


def test_linear_probe_test_label_beyond_training_classes():
    "A test class never seen in training is simply always wrong (n_classes taken from both label sets)."
    (x, y), (tx, ty) = separable(200, C=4), separable(40, C=5)
    r = linear_probe(x, y, tx, ty, epochs=20, batch_size=64)
    assert r["classifier"].out_features == 5 and r["top1"] == pytest.approx(80.0)


@pytest.mark.parametrize("device", DEVICES)
def test_probes_run_on_the_features_device(device):
    (x, y), (tx, ty) = separable(200), separable(50, seed=1)
    x, y, tx, ty = (t.to(device) for t in (x, y, tx, ty))
    r = linear_probe(x, y, tx, ty, epochs=20, batch_size=200)
    assert r["top1"] == 100.0 and r["classifier"].weight.device.type == device
    scale = torch.logspace(-3, 2, 32, device=device)
    k = knn_classify((x - 5) / scale, y, (tx - 5) / scale, ty, k=5)  # cosine kNN is not scale-invariant: undo the scales
    assert k["top1"] == 100.0 and k["predictions"].device.type == device


# ---------------------------------------------------------------- bad input

F2, Y2 = torch.randn(10, 4), torch.arange(10) % 3

KNN_BAD = [
    (dict(k=0), "k must be"), (dict(k=11), r"k must be an int in \[1, 10\]"), (dict(k=2.0), "k must be"), (dict(k=True), "k must be"),
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(chunk=0), "chunk"), (dict(n_classes=2), "n_classes"),
    (dict(train_labels=Y2[:9]), "train_labels has 9 labels"), (dict(train_labels=Y2 - 1), "train_labels must be >= 0"),
    (dict(train_labels=Y2.float()), "train_labels must be a 1-D integer"), (dict(train_feats=F2[:, 0]), "train_feats must be a float"),
    (dict(train_feats=F2.long()), "train_feats must be a float"), (dict(test_feats=F2[:, :3]), "test_feats must have 4 columns"),
    (dict(test_labels=Y2[:5]), "test_labels has 5 labels"), (dict(test_labels=-Y2), "test_labels must be >= 0"),
    (dict(test_feats=F2[:0], test_labels=Y2[:0]), "test_feats must have at least one row"),
    (dict(train_feats=F2.clone().fill_(math.nan)), "train_feats contains NaN"),
]


@pytest.mark.parametrize("kw,msg", KNN_BAD)
def test_knn_bad_input(kw, msg):
    args = dict(train_feats=F2, train_labels=Y2, test_feats=F2, test_labels=Y2, k=3)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        knn_classify(args.pop("train_feats"), args.pop("train_labels"), args.pop("test_feats"), args.pop("test_labels"), **args)


PROBE_BAD = [
    (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"), (dict(base_lr=0.0), "base_lr"), (dict(momentum=1.0), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(test_labels=None), "test_feats and test_labels"),
    (dict(train_labels=Y2 - 1), "train_labels must be >= 0"), (dict(test_feats=F2[:, :2]), "test_feats must have 4 columns"),
    (dict(n_classes=1), "n_classes"),
]


@pytest.mark.parametrize("kw,msg", PROBE_BAD)
def test_linear_probe_bad_input(kw, msg):
    args = dict(train_feats=F2, train_labels=Y2, test_feats=F2, test_labels=Y2, epochs=1)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        linear_probe(args.pop("train_feats"), args.pop("train_labels"), args.pop("test_feats"), args.pop("test_labels"), **args)


# ---------------------------------------------------------------- features and evaluate

class MeanColour(nn.Module):
    "A parameter-free 'encoder': the mean colour of each image, which is what separates the classes below."
    def forward(self, x): return x.mean((2, 3))


def colour_set(n, seed=0, size=8, labelled=True):
    "Images of one of 3 flat colours (the class) with a little noise."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    base = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200]])[y]
    images = (base[:, :, None, None] + torch.randint(-20, 21, (n, 3, size, size), generator=g)).to(torch.uint8)
    return TensorImages(images, y if labelled else torch.full((n,), -1), classes=["r", "g", "b"])


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return resnet("resnet18", width=0.0625, small_stem=True)


def test_extract_features_restores_mode_and_is_batch_independent(encoder):
    data = colour_set(10, size=16)
    encoder.train()
    f1, y1 = extract_features(encoder, data, batch_size=3)  # batches of 3, 3, 3 and 1
    assert encoder.training and f1.shape == (10, encoder.feat_dim) and f1.dtype == torch.float32 and torch.equal(y1, torch.arange(10) % 3)
    encoder.eval()
    f10, _ = extract_features(encoder, data, batch_size=10)
    assert not encoder.training
    torch.testing.assert_close(f10, f1, atol=1e-5, rtol=1e-4)  # BN in eval mode: a feature does not see its batch
    encoder.train()


def test_extract_features_resizes_whole_images(encoder):
    data = colour_set(4, size=16)
    f, _ = extract_features(encoder, data, image_size=8)
    x = torch.nn.functional.interpolate(data.images.float() / 255, size=(8, 8), mode="bilinear", antialias=True)
    with torch.no_grad(): ref = encoder.eval()(x.clamp(0, 1))
    encoder.train()
    torch.testing.assert_close(f, ref, atol=1e-5, rtol=1e-4)
    fb, _ = extract_features(encoder, data, dtype=torch.bfloat16)  # autocast on the CPU, features back in float32
    assert fb.dtype == torch.float32 and fb.shape == (4, encoder.feat_dim)


@pytest.mark.parametrize("kw,msg", [(dict(image_size=0), "image_size"), (dict(batch_size=0), "batch_size")])
def test_extract_features_bad_input(encoder, kw, msg):
    with pytest.raises(ValueError, match=msg): extract_features(encoder, colour_set(3), **kw)
    empty = TensorImages(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="dataset must not be empty"): extract_features(encoder, empty)


def test_evaluate_with_a_perfect_encoder():
    r = evaluate(MeanColour(), colour_set(60), {"test": colour_set(30, seed=1), "other": colour_set(9, seed=2)},
                 knn_k=5, linear_epochs=20, linear_batch_size=32)
    assert list(r) == ["test", "other"]
    for split in r.values():
        assert {k: split[k] for k in ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "knn_balanced", "linear_balanced")} == dict(
            knn_top1=100.0, knn_top5=None, linear_top1=100.0, linear_top5=None, knn_balanced=100.0, linear_balanced=100.0)  # 3 classes: no top-5
        assert sum(split["class_counts"]) in (30, 9) and len(split["class_counts"]) == 3 and 0 < split["majority_top1"] < 100


def test_evaluate_bad_input():
    with pytest.raises(ValueError, match="test_sets must be a non-empty dict"): evaluate(MeanColour(), colour_set(6), {})
    with pytest.raises(ValueError, match="train_set has items without a label"):
        evaluate(MeanColour(), colour_set(6, labelled=False), {"test": colour_set(3)})
    with pytest.raises(ValueError, match="test split 'x' has items without a label"):
        evaluate(MeanColour(), colour_set(6), {"x": colour_set(3, labelled=False)}, knn_k=2)
    with pytest.raises(ValueError, match="k must be an int in"): evaluate(MeanColour(), colour_set(6), {"t": colour_set(3)}, knn_k=7)


def test_evaluate_from_config_splits(encoder):
    cfg = preset("tiny")
    r = evaluate_from_config(encoder, cfg, splits=("test_ood",), n=24, cache_dir=False)
    assert list(r) == ["test_ood"] and set(r["test_ood"]) == {"knn_top1", "knn_top5", "linear_top1", "linear_top5", "knn_balanced",
                                                              "linear_balanced", "majority_top1", "class_counts"}
    with pytest.raises(ValueError, match="splits must be a non-empty subset of test, test_ood \\(the held-out splits"):
        evaluate_from_config(encoder, cfg, splits=("val",))


def test_format_table():
    results = {"random init": {"test": {"knn_top1": 12.345, "linear_top1": 20.0}, "test_ood": {"knn_top1": 9.0}},
               "trained": {"test": {"knn_top1": 80.0, "linear_top1": 85.25}, "test_ood": {"knn_top1": 70.0, "linear_top1": 72.0}}}
    lines = format_table(results).splitlines()
    assert len(lines) == 4 and len({len(l) for l in lines[1:]}) == 1  # header of metrics and rows aligned
    assert lines[0].split() == ["test", "test_ood"] and lines[1].split() == ["knn_top1", "linear_top1"] * 2
    assert lines[2].split() == ["random", "init", "12.3", "20.0", "9.0", "-"]
    assert lines[3].split() == ["trained", "80.0", "85.2", "70.0", "72.0"]
    assert format_table(results, metrics=("linear_top1",), digits=2).splitlines()[3].split() == ["trained", "85.25", "72.00"]
    assert format_table(results, metrics=("knn_top1",)).splitlines()[0].split() == ["test", "test_ood"]
    only_test = {"a": {"test": {"knn_top1": 1.0}, "test_ood": {}}}
    assert format_table(only_test).splitlines()[0].split() == ["test"]  # a split without values gets no column
    with pytest.raises(ValueError, match="results must be"): format_table({})
    with pytest.raises(ValueError, match="metrics must name some of knn_top1, linear_top1"): format_table(results, metrics=("top1",))


# ---------------------------------------------------------------- the official protocol: augmented crops

from relicv2.evaluate import PixelEncoder
from relicv2.official_eval import CentreCrops, RandomCrops, augmented_linear_eval, encoder_fingerprint


def _images(n, h=20, w=26, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    return TensorImages(torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8), torch.arange(n) % classes)


def test_centre_crop_matches_pil_bicubic_when_enlarging():
    "An independent reference: PIL's bicubic (Keys a = -0.5; no antialiasing when enlarging) on the same box."
    from PIL import Image
    g = torch.Generator().manual_seed(0)  # values in 48..208: PIL rounds and clips to uint8 between its two passes,
    x = (128 + 80 * (2 * torch.rand(1, 3, 28, 28, generator=g) - 1)).round().to(torch.uint8)  # so no overshoot is clipped
    ds = TensorImages(x, torch.zeros(1, dtype=torch.long))
    ours = CentreCrops(ds, 32, 0.875)[0][0]  # crop int(0.875 * 28) = 24 at offset 2, enlarged to 32
    pil = Image.fromarray(x[0].permute(1, 2, 0).numpy()).resize((32, 32), Image.BICUBIC, box=(2, 2, 26, 26))
    ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    assert (ours.int() - ref.int()).abs().max() <= 1  # PIL's fixed-point weights: off by one at most


@pytest.mark.parametrize("h,w,fraction", [(32, 40, 7 / 8), (40, 32, 7 / 8), (31, 33, 0.5), (16, 16, 1.0)])
def test_centre_crop_of_the_output_size_is_the_central_slice(h, w, fraction):
    ds = _images(1, h, w)
    side = int(fraction * min(h, w))
    x0, y0 = (w - side + 1) // 2, (h - side + 1) // 2
    assert torch.equal(CentreCrops(ds, side, fraction)[0][0], ds.images[0, :, y0:y0 + side, x0:x0 + side])


def test_random_crops_are_a_function_of_seed_epoch_and_index_even_across_workers():
    from torch.utils.data import DataLoader
    from relicv2.items import collate
    crops = RandomCrops(_images(12), 16, seed=3)
    crops.set_epoch(2)
    alone = torch.stack([crops[i][0] for i in range(12)])
    workers = torch.cat([b.images for b in DataLoader(crops, batch_size=5, num_workers=2, collate_fn=collate)])
    assert torch.equal(alone, workers)
    crops.set_epoch(3)
    assert not torch.equal(alone, torch.stack([crops[i][0] for i in range(12)]))
    assert not torch.equal(alone, torch.stack([RandomCrops(_images(12), 16, seed=4).__getitem__(i)[0] for i in range(12)]))


def test_random_crops_of_images_of_any_size_batch_together():
    from relicv2.items import collate
    items = [RandomCrops(_images(1, h, w, seed=h), 24)[0] for h, w in ((20, 50), (64, 18), (24, 24))]
    assert collate(items).images.shape == (3, 3, 24, 24)


@pytest.mark.parametrize("make,msg", [
    (lambda: RandomCrops(_images(2), 0), "size must be an int >= 1"),
    (lambda: RandomCrops(_images(2), 8, scale=(0.5, 0.2)), "scale must be a pair"),
    (lambda: CentreCrops(_images(2), 8, 0.0), "fraction must be in (0, 1]"),
])
def test_crop_datasets_bad_input(make, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        make()


class CountingPixels(PixelEncoder):
    "The raw-pixel encoder, counting its forward passes (no weights: the same fingerprint as PixelEncoder)."
    calls = 0
    def forward(self, x):
        CountingPixels.calls += 1
        return super().forward(x)


def _colours(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = (torch.eye(4, 3)[y][:, :, None, None] * 0.5 + 0.25 + 0.2 * torch.randn(n, 3, 12, 12, generator=g)).clamp(0, 1)
    return TensorImages((255 * x).to(torch.uint8), y)


KW = dict(image_size=8, epochs=3, batch_size=16, base_lr=0.5)


def test_augmented_eval_learns_and_its_state_folder_saves_every_pass(tmp_path):
    tr, te = _colours(128, 0), _colours(64, 1)
    r = augmented_linear_eval(PixelEncoder(), tr, {"test": te}, state_dir=tmp_path, **KW)
    assert r["test"]["linear_top1"] > 90 and r["test"]["linear_top5"] is None  # 4 classes: no top-5
    CountingPixels.calls = 0
    again = augmented_linear_eval(CountingPixels(), tr, {"test": te}, state_dir=tmp_path, **KW)
    assert again == r and CountingPixels.calls == 0  # a finished probe and cached test features: nothing recomputed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features_test.pt", "probe.pt"]


def test_augmented_eval_refuses_a_state_folder_of_another_encoder_or_setting(tmp_path):
    tr, te = _colours(64, 0), _colours(32, 1)
    augmented_linear_eval(PixelEncoder(), tr, {"test": te}, state_dir=tmp_path, **KW)
    enc = resnet("resnet18", 0.0625, True)
    with pytest.raises(ValueError, match="feature cache .* other settings .*encoder"):
        augmented_linear_eval(enc, tr, {"test": te}, state_dir=tmp_path, **KW)
    with pytest.raises(ValueError, match="probe checkpoint .*epochs: 3 there, 4 now"):
        augmented_linear_eval(PixelEncoder(), tr, {"test": te}, state_dir=tmp_path, **{**KW, "epochs": 4})
    (tmp_path / "probe.pt").write_bytes((tmp_path / "probe.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        augmented_linear_eval(PixelEncoder(), tr, {"test": te}, state_dir=tmp_path, **KW)


def test_encoder_fingerprint_follows_the_weights():
    a, b = resnet("resnet18", 0.0625, True), resnet("resnet18", 0.0625, True)
    b.load_state_dict(a.state_dict())
    assert encoder_fingerprint(a) == encoder_fingerprint(b)
    with torch.no_grad(): b.conv1.weight[0, 0, 0, 0] += 1e-6
    assert encoder_fingerprint(a) != encoder_fingerprint(b)


@pytest.mark.parametrize("kw,msg", [
    (dict(test_sets={}), "test_sets must be a non-empty dict"),
    (dict(epochs=0), "epochs must be an int >= 1"),
    (dict(image_size=1.5), "image_size must be an int >= 1"),
    (dict(momentum=1.0), r"momentum must be a float in \[0, 1\)"),
    (dict(base_lr=-1.0), "base_lr must be a float > 0"),
    (dict(n_classes=2), r"label outside 0..1"),
])
def test_augmented_eval_bad_input(kw, msg):
    tr, te = _colours(16, 0), _colours(8, 1)
    args = dict(test_sets={"test": te}, **{**KW, "epochs": 1})
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        augmented_linear_eval(PixelEncoder(), tr, **args)


def test_evaluate_from_config_augmented_protocol():
    from relicv2.config import update
    cfg = update(preset("tiny"), {"eval.protocol": "augmented", "eval.linear_epochs": 1})
    res = evaluate_from_config(resnet("resnet18", 0.0625, True), cfg, splits=("test",))
    assert set(res) == {"test"} and set(res["test"]) == {"linear_top1", "linear_top5"}
    with pytest.raises(ValueError, match="eval.linear_solver=sgd"):
        evaluate_from_config(resnet("resnet18", 0.0625, True), update(cfg, {"eval.linear_solver": "lbfgs"}))


def test_probes_sit_below_evaluate():
    "relicv2.probes imports neither relicv2.evaluate nor relicv2.official_eval: the layering is probes < official_eval < evaluate."
    import subprocess, sys
    code = "import sys, relicv2.probes; assert not {'relicv2.evaluate', 'relicv2.official_eval'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_raw_pixel_baseline_is_drawn_down_within_its_budget_and_says_so(monkeypatch, encoder):
    # what lets an ImageNet-size run write eval.json: raw pixels above PIXEL_BUDGET are drawn down, in the table's words
    from relicv2.cli import results_table
    from relicv2.evaluate import PIXEL_BUDGET, PixelEncoder
    cfg = preset("tiny")  # 16 px images: 768 pixel values an image, 3 splits of 24 images
    assert PixelEncoder.max_feature_bytes == PIXEL_BUDGET == 4 * 2**30
    monkeypatch.setattr(PixelEncoder, "max_feature_bytes", 3 * 24 * 768 * 4 // 2)  # half of what they need
    rows = {"raw pixels": evaluate_from_config(PixelEncoder(), cfg, n=24, cache_dir=False),
            "random init": evaluate_from_config(encoder, cfg, n=24, cache_dir=False)}  # an encoder is never drawn down
    note = rows["raw pixels"]["test"]["note"]
    assert note.startswith("subsampled: 12 of 24 train images, 12 of 24 test images, 12 of 24 test_ood images, drawn by seed 0")
    assert rows["raw pixels"]["test_ood"]["note"] == note and "note" not in rows["random init"]["test"]
    assert results_table(rows, 10).splitlines()[-1] == f"raw pixels: {note}"


@pytest.mark.parametrize("kind", ["GlobalBatchNorm", "SyncBatchNorm"])  # what train.sync_bn gives on the CPU / on CUDA
def test_bn_recalibration_of_a_sync_bn_encoder_calls_no_collective(monkeypatch, encoder, kind):
    # the evaluation runs on process 0 alone: a synchronised BN there would wait for processes that have left (a hang)
    import copy
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from relicv2.distributed import sync_batchnorm
    from relicv2.evaluate import recalibrate_bn
    data = colour_set(12, size=16)
    plain = recalibrate_bn(encoder, data, 12, batch_size=4)
    synced = (sync_batchnorm(copy.deepcopy(encoder), torch.device("cpu")) if kind == "GlobalBatchNorm"
              else nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(encoder)))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)  # a job of two processes, this one rank 0
    try:
        def refuse(*a, **k): raise AssertionError("a collective in the recalibration")
        monkeypatch.setattr(dist, "all_reduce", refuse)
        monkeypatch.setattr(dist, "all_gather", refuse)
        local = recalibrate_bn(synced, data, 12, batch_size=4)
    finally: dist.destroy_process_group()
    assert not any(isinstance(m, (nn.SyncBatchNorm,)) or type(m).__name__ == "GlobalBatchNorm" for m in local.modules())
    for (k, a), b in zip(plain.state_dict().items(), local.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)


def _folder(root, split, counts, size=24):
    "root/split/class/i.png, `counts[class]` random images of each class."
    from PIL import Image
    g = torch.Generator().manual_seed(len(counts))
    for c, n in counts.items():
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()).save(root / split / c / f"{i}.png")


def _train(root, out, *extra):
    import subprocess, sys
    return subprocess.run([sys.executable, "-c", "import sys; from relicv2.cli import train_main; sys.exit(train_main())",
                           "--preset", "tiny", "--no-progress", "--max-steps", "1", "--set", f"data.dataset=imagefolder:{root}",
                           "--set", f"train.out_dir={out}", "--set", "eval.linear_epochs=2", "--set", "eval.knn_k=5", *extra],
                          capture_output=True, text=True, timeout=300)


def test_a_split_missing_a_class_is_named_before_training_and_reported_with_its_floor(tmp_path):
    # imbalanced training classes (30 vs 12), a validation split that holds only the first: warned by name before the
    # first step, evaluated, and the table says what always answering the majority class scores (never "chance is")
    root = tmp_path / "data"
    _folder(root, "train", {"ant": 30, "bee": 12}); _folder(root, "val", {"ant": 10})
    r = _train(root, tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "split 'val' has no image of 1 of the 2 training classes (bee)" in r.stderr, r.stderr
    val = json.loads((tmp_path / "run" / "eval.json").read_text())["trained"]["val"]
    assert val["class_counts"] == [10, 0] and val["majority_top1"] == 100.0 and 0 <= val["linear_balanced"] <= 100
    assert "chance is" not in r.stdout and "val: 10 images of 1 of the 2 classes" in r.stdout, r.stdout
    assert "always answering the most frequent training class scores 100.0%" in r.stdout and "linear_balanced" in r.stdout


def test_a_split_with_a_class_unknown_to_training_is_refused_before_training(tmp_path):
    root = tmp_path / "data"
    _folder(root, "train", {"ant": 10, "bee": 10}); _folder(root, "val", {"ant": 3, "cat": 3})
    r = _train(root, tmp_path / "run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cat" in r.stderr and "not classes of the training split" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
