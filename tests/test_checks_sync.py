"""anydepth_kernels.ops._checks: the helpers that keep host-reading checks off the hot path."""
import gc

import torch

from anydepth_kernels.ops import _checks


def test_host_read_syncs():
    assert not _checks.host_read_syncs(torch.zeros(2))
    assert _checks.host_read_syncs(torch.zeros(2, device="meta"))


def test_checked_once_identity_version_and_extra():
    cache = _checks.CheckedOnce()
    a, b = torch.tensor([1, 2]), torch.tensor([3])
    assert not cache.seen((a, b), 16)
    cache.add((a, b), 16)
    assert cache.seen((a, b), 16)
    assert not cache.seen((a, b), 17)  # another extra: another check
    assert not cache.seen((b, a), 16)
    assert not cache.seen((a.clone(), b), 16)  # equal content, other tensor
    a[0] = 5  # in place: the version counter moves
    assert not cache.seen((a, b), 16)
    cache.add((a, b), 16)
    a[:1].add_(1)  # through a view: shares the counter
    assert not cache.seen((a, b), 16)
    cache.add((a, b), 16)
    a.view(2, 1).mul_(2)
    assert not cache.seen((a, b), 16)


def test_checked_once_freed_tensor_is_never_mistaken():
    cache = _checks.CheckedOnce()
    a = torch.tensor([1, 2])
    cache.add((a,))
    key_id = id(a)
    del a
    gc.collect()
    # a new tensor may reuse the id; the weak reference tells them apart
    for _ in range(100):
        b = torch.tensor([9, 9])
        if id(b) == key_id:
            break
    assert not cache.seen((b,))


def test_checked_once_lru_and_clear():
    cache = _checks.CheckedOnce(maxsize=2)
    ts = [torch.tensor([i]) for i in range(3)]
    cache.add((ts[0],))
    cache.add((ts[1],))
    assert cache.seen((ts[0],))  # now the most recently used
    cache.add((ts[2],))  # drops ts[1]
    assert cache.seen((ts[0],)) and cache.seen((ts[2],)) and not cache.seen((ts[1],))
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and not cache.seen((ts[0],))


def test_checked_once_inference_tensors():
    """Inference tensors have no version counter: they are remembered by identity alone."""
    cache = _checks.CheckedOnce()
    with torch.inference_mode():
        a = torch.tensor([1, 2])
        cache.add((a,))
        assert cache.seen((a,))
    assert cache.seen((a,))
