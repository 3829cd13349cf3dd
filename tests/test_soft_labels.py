"""Soft-label evaluation (SRe2L's relabel, online): the KL loss, the augmentation both networks
see, CutMix's area mixing, recipes, and the effect of soft labels on a 1-image-per-class set."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metadd_fast.augment import DiffAugment
from metadd_fast.data import load_digits
from metadd_fast.evaluate import evaluate_synthetic
from metadd_fast.models import ConvNet
from metadd_fast.recipes import RECIPES, resolve
from metadd_fast.soft_labels import crop_box, cutmix, kd_loss, mix_targets
from metadd_fast.student import train_student
from metadd_fast.training import accuracy, train_model


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_kd_loss_and_its_temperature_scaling_match_a_plain_reference(T):
    s = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 10, dtype=torch.float64) * 3
    p = torch.softmax(t / T, dim=1)
    reference = (p * (p.log() - torch.log_softmax(s / T, dim=1))).sum(1).mean() * T ** 2
    loss = kd_loss(s, t, T)
    torch.testing.assert_close(loss, reference)
    loss.backward()
    # d/ds of KL * T^2 is T (softmax(s / T) - softmax(t / T)) / B
    torch.testing.assert_close(s.grad, T * (torch.softmax(s.detach() / T, 1) - p) / 6)
    assert float(kd_loss(t, t, T)) == pytest.approx(0, abs=1e-12)


class Spy(nn.Module):
    """A linear classifier that records every input it is given."""

    def __init__(self, seen: list, c: int = 1, hw: int = 8, k: int = 10):
        super().__init__()
        self.fc = nn.Linear(c * hw * hw, k)
        self.seen, self.grad_modes = seen, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        self.grad_modes.append(torch.is_grad_enabled())
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("recipe", ["sre2l-imagenet", "default"])
def test_teacher_and_student_see_the_same_augmented_images(recipe):
    images, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 10
    student_seen, teacher_seen = [], []
    teacher = Spy(teacher_seen).train()
    rec = resolve(recipe, epochs=2, batch_size=5)
    train_student(Spy(student_seen), images, labels, rec, teacher=teacher, seed=3)
    assert len(student_seen) == len(teacher_seen) == 2 * 3
    for s, t in zip(student_seen, teacher_seen):
        assert torch.equal(s, t)
    assert not teacher.training  # the teacher ran in eval mode
    assert not any(teacher.grad_modes)  # and under no_grad
    batch = student_seen[0]
    assert not any(torch.equal(batch[i], images[j]) for i in range(len(batch)) for j in range(12))  # augmented


def test_random_resized_crop_draws_boxes_as_sre2l_within_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    boxes = [crop_box(64, 64, g) for _ in range(400)]
    areas = torch.tensor([h * w / 64 ** 2 for _, _, h, w in boxes])
    ratios = torch.tensor([w / h for _, _, h, w in boxes])
    assert areas.min() >= 0.06 and areas.max() <= 1.0 and 0.3 < float(areas.mean()) < 0.8
    assert ratios.min() >= 0.7 and ratios.max() <= 1.4
    assert all(0 <= top <= 64 - h and 0 <= left <= 64 - w for top, left, h, w in boxes)


def test_cutmix_mixes_soft_labels_by_area():
    B, H, W = 6, 16, 12
    x = torch.arange(B, dtype=torch.float32)[:, None, None, None].expand(B, 1, H, W).contiguous()
    for seed in range(5):
        mixed, perm, lam = cutmix(x, torch.Generator().manual_seed(seed), alpha=1.0)
        own = (mixed == x).float().mean(dim=(1, 2, 3))
        moved = perm != torch.arange(B)
        assert torch.allclose(own[moved], torch.full_like(own[moved], lam))  # lam = the share of own pixels
        assert torch.equal(mixed[~moved], x[~moved])
        p = torch.softmax(torch.randn(B, 10), dim=1)
        torch.testing.assert_close(mix_targets(p, perm, lam), lam * p + (1 - lam) * p[perm])
        # a teacher that reads the mean pixel gives the area-mixed target of a linear labelling
        torch.testing.assert_close(mixed.mean(dim=(1, 2, 3)), mix_targets(x.mean(dim=(1, 2, 3))[:, None], perm,
                                                                         lam)[:, 0])


def test_recipes_are_overridden_by_explicit_settings_only():
    r = resolve("sre2l-tiny", epochs=3, lr=None)
    assert r.epochs == 3 and r.lr == 0.2 and r.temperature == 20 and r.warmup_epochs == 5
    assert resolve("dc") == RECIPES["dc"] and resolve() == RECIPES["default"]
    assert RECIPES["dm"].epochs == 1000 and RECIPES["dm"].augment == RECIPES["default"].augment
    with pytest.raises(ValueError, match="recipe"):
        resolve("sre2l-cifar")
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    with pytest.raises(ValueError, match="recipe"):
        evaluate_synthetic(x, y, load_digits("test", 8), ["LeNet"], recipe="nope")
    for T in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            evaluate_synthetic(x, y, load_digits("test", 8), ["LeNet"], temperature=T)


def test_a_teacher_whose_classes_or_images_do_not_fit_is_refused():
    test = load_digits("test", 16)
    x, y = test.images[:4], test.labels[:4]
    with pytest.raises(ValueError, match="soft_labels: the teacher gives .7,. outputs, but the data set has 10"):
        evaluate_synthetic(x, y, test, ["LeNet"], soft_labels=ConvNet(1, 7, width=8, im_size=(16, 16)))
    with pytest.raises(ValueError, match="soft_labels: the teacher cannot take 1x16x16 images"):
        evaluate_synthetic(x, y, test, ["LeNet"], soft_labels=ConvNet(3, 10, width=8, im_size=(16, 16)))


def test_train_model_is_the_default_recipe_bit_for_bit():
    """train_model runs through train_student; a plain loop of DC's protocol gives the same weights."""
    images, labels = torch.randn(20, 1, 8, 8), torch.arange(20) % 10
    for augment in (None, DiffAugment()):
        torch.manual_seed(1)
        a = ConvNet(1, 10, width=8, depth=2, im_size=(8, 8))
        b = ConvNet(1, 10, width=8, depth=2, im_size=(8, 8))
        b.load_state_dict(a.state_dict())
        train_model(a, images, labels, epochs=3, batch_size=8, augment=augment, seed=5)
        g = torch.Generator().manual_seed(5)
        opt = torch.optim.SGD(b.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.1)
        b.train()
        for _ in range(3):
            for idx in torch.randperm(20, generator=g).split(8):
                x = images[idx]
                if augment is not None:
                    x = augment(x, int(torch.randint(1 << 30, (1,), generator=g)), siamese=False)
                loss = F.cross_entropy(b(x), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        for p, q in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(p, q)


def test_soft_labels_beat_hard_labels_on_one_real_image_per_class():
    """On digits 16x16, 1 real image per class: a student trained on a >= 90% teacher's soft
    labels beats the hard-label student, averaged over seeds (same recipe, same crops)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, test = load_digits("train", 16), load_digits("test", 16)
    net = partial(ConvNet, width=32, depth=2)
    torch.manual_seed(0)
    teacher = net(channel=1, num_classes=10, im_size=(16, 16))
    train_model(teacher, train.images, train.labels, epochs=4, batch_size=64)
    assert accuracy(teacher, test.images, test.labels) >= 0.9
    idx = torch.stack([torch.nonzero(train.labels == c)[0, 0] for c in range(10)])
    kw = dict(seeds=2, epochs=40, batch_size=10, progress=False, recipe="default")
    hard = evaluate_synthetic(train.images[idx], train.labels[idx], test, {"S": net}, **kw)["S"]
    soft = evaluate_synthetic(train.images[idx], train.labels[idx], test, {"S": net}, soft_labels=teacher,
                              temperature=4.0, **kw)["S"]
    print(f"hard {hard['acc']} mean {hard['mean']:.3f}; soft {soft['acc']} mean {soft['mean']:.3f}")
    assert soft["mean"] >= hard["mean"] + 0.05, (hard["acc"], soft["acc"])
