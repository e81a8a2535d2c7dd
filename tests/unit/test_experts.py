"""Expert fingerprints: what lets the shim notice an overwritten expert shard (in-process, plain tensors)."""

from __future__ import annotations

import torch

from ep_ds_shim.experts import Fingerprint


def test_fingerprints_catch_changes_and_tolerate_dtype_casts():
    torch.manual_seed(0)
    experts = torch.randn(8, 300, 500)  # spans several chunks
    before = Fingerprint.of(experts)
    assert before.matches(Fingerprint.of(experts.clone()))
    swapped = experts[[1, 0, *range(2, 8)]]  # two experts swapped: same plain sum
    assert not before.matches(Fingerprint.of(swapped))
    nudged = experts.clone()
    nudged[5] += 1e-3  # one expert shifted slightly: every expert is sampled (not meant for single bits)
    assert not before.matches(Fingerprint.of(nudged))
    replaced = experts.clone()
    replaced[3] = torch.randn(300, 500)  # one expert's weights from elsewhere
    assert not before.matches(Fingerprint.of(replaced))
    assert not Fingerprint.of(torch.randn(3)).matches(Fingerprint.of(torch.randn(3)))  # short tensors: all read
    assert Fingerprint.of(torch.empty(0, 4)).matches(Fingerprint.of(torch.empty(0, 4)))  # empty ones: nothing to read
    assert before.matches(Fingerprint.of(experts.to(torch.bfloat16)))  # DeepSpeed casting the model
    assert not before.matches(Fingerprint.of(torch.randn(8, 300, 500).to(torch.bfloat16)))  # other experts
