"""Label jitter keeps each face's mean target at its apparent age, also next to the age range's ends."""
import torch

from faceage.training import MAX_AGE, MIN_AGE, SeededSamples


class _Rated:
    """Faces with one apparent age and rating spread each."""

    def __init__(self, age: float, std: float, n: int = 2000):
        self.age, self.std, self.n = age, std, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return torch.zeros(1), torch.tensor(self.age), torch.tensor(self.std)


def _targets(age: float, std: float) -> torch.Tensor:
    ds = SeededSamples(_Rated(age, std), seed=3, label_jitter=True)
    return torch.stack([ds[(i, 0)][1] for i in range(len(ds))])


def test_a_baby_rated_with_a_spread_is_not_taught_older_on_average():
    # Clamping N(1, 3) at 0 raised the mean target to ~1.6 years: a bias toward older for every baby.
    t = _targets(1.0, 3.0)
    assert t.min() >= MIN_AGE and t.max() <= MAX_AGE
    assert abs(t.mean().item() - 1.0) < 0.05
    assert t.std().item() > 0.3  # still jittered


def test_the_oldest_are_not_taught_younger_and_the_middle_keeps_its_full_spread():
    t = _targets(99.0, 4.0)
    assert t.max() <= MAX_AGE and abs(t.mean().item() - 99.0) < 0.05
    mid = _targets(40.0, 4.0)
    assert abs(mid.mean().item() - 40.0) < 0.3 and abs(mid.std().item() - 4.0) < 0.3


def test_no_spread_means_the_label_itself():
    assert torch.equal(_targets(0.0, 0.0), torch.zeros(2000))
