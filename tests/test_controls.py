"""The mask controls (relicv2.mask_controls, data.masks=wrong and degraded:IOU) on the spurious benchmark's training
images: the area kept, the IoU reached, the same masks from every construction and every train.seed."""
import pytest
import torch

from relicv2.config import preset, update
from relicv2.items import TensorImages
from relicv2.data import from_config
from relicv2.distributed import DistEnv
from relicv2.mask_controls import control_masks, degraded_masks, wrong_masks
from relicv2.data import SaliencyMasked
from relicv2.saliency_metrics import iou_score
from relicv2.spurious import SpuriousShapes
from relicv2.train import training_set


@pytest.fixture(scope="module")
def spurious():
    return SpuriousShapes("train", size=24, n=512)


def _masks(ds) -> torch.Tensor:
    return torch.stack([ds[i][1] for i in range(len(ds))])


def _area(m: torch.Tensor) -> torch.Tensor:
    return m.flatten(1).sum(1)


def test_wrong_masks_keep_each_area_and_miss_the_object(spurious):
    got = _masks(SaliencyMasked(spurious, "wrong"))
    assert torch.equal(_area(got), _area(spurious.masks))  # the same pixels count, image by image
    assert iou_score(got, spurious.masks).mean() < 0.02
    assert not torch.equal(got, spurious.masks)


@pytest.mark.parametrize("q", [0.9, 0.7, 0.5])
def test_degraded_masks_reach_the_asked_iou_on_average_with_each_area_kept(spurious, q):
    ds = SaliencyMasked(spurious, f"degraded:{q}")
    got = _masks(ds)
    assert torch.equal(_area(got), _area(spurious.masks))
    iou = iou_score(got, spurious.masks)
    assert abs(iou.mean().item() - q) <= 0.05
    assert f"mean IoU {iou.mean().item():.3f}, mean area ratio 1.000" in ds.summary


def test_the_controls_are_the_same_from_every_construction_batch_and_train_seed(spurious):
    for source in ("wrong", "degraded:0.7"):
        a, b = _masks(SaliencyMasked(spurious, source)), _masks(SaliencyMasked(spurious, source))
        assert torch.equal(a, b), source
        idx = torch.tensor([7, 300])  # two images drawn alone: each keeps the mask it had in the whole set
        alone = wrong_masks(spurious.masks[idx], idx) if source == "wrong" else degraded_masks(spurious.masks[idx], 0.7, idx)
        assert torch.equal(alone, a[idx]), source
    cfg = update(preset("tiny"), {"data.dataset": "spurious", "data.masks": "degraded:0.7", "views.mask_prob": 0.5})
    runs = [training_set(update(cfg, {"train.seed": s}), DistEnv(), progress=False)[0] for s in (0, 1)]
    assert torch.equal(_masks(runs[0]), _masks(runs[1]))  # a grid's seeds all see the same control masks


def test_from_config_applies_a_control_and_evaluation_reads_no_masks():
    cfg = update(preset("tiny"), {"data.dataset": "spurious", "data.masks": "wrong"}).data
    train, test = from_config(cfg, "train"), from_config(cfg, "test", masks=False)
    assert isinstance(train, SaliencyMasked) and train.n_masks == len(train) and "data.masks=wrong" in train.summary
    assert not isinstance(test, SaliencyMasked)


def test_a_control_needs_the_dataset_s_own_masks():
    plain = TensorImages(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="data.masks='wrong' controls a dataset's own masks, and this dataset has none"):
        SaliencyMasked(plain, "wrong")
    with pytest.raises(ValueError, match="0 < IOU < 1"):
        SaliencyMasked(plain, "degraded:1.0")
    with pytest.raises(ValueError, match="a mask control is one of wrong, degraded:IOU, got 'border'"):
        control_masks(plain, "border")
