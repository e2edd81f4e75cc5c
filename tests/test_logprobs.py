"""Log-probabilities of labels against a float64 reference, with masking and chunking."""

import torch

from twophase.losses.logprobs import (
    IGNORE_INDEX,
    response_mask,
    sequence_logprobs,
    token_logprobs,
    token_logprobs_from_hidden,
)


def _reference(logits, labels):
    """Straightforward float64 computation over the full vocabulary."""
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def _labels():
    labels = torch.tensor(
        [
            [IGNORE_INDEX, IGNORE_INDEX, 5, 7, 2, IGNORE_INDEX],
            [IGNORE_INDEX, 3, 3, 9, 1, 4],
        ]
    )
    return labels


def test_token_logprobs_match_float64_reference_with_masking():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11) * 3
    labels = _labels()
    expected, mask = _reference(logits, labels)
    for chunk in (1, 3, 1024):
        got = token_logprobs(logits, labels, chunk_size=chunk)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
        assert (got[~mask] == 0).all()
    sums = sequence_logprobs(token_logprobs(logits, labels), response_mask(labels))
    torch.testing.assert_close(sums.double(), expected.sum(-1), rtol=0, atol=1e-5)
    means = sequence_logprobs(token_logprobs(logits, labels), response_mask(labels), average=True)
    torch.testing.assert_close(means.double(), expected.sum(-1) / mask.sum(-1), rtol=0, atol=1e-5)


def test_bf16_logits_are_upcast_before_logsumexp():
    torch.manual_seed(1)
    logits = (torch.randn(2, 6, 50) * 5).to(torch.bfloat16)
    labels = _labels()
    expected, _ = _reference(logits.float(), labels)  # same bf16 values, exact arithmetic
    got = token_logprobs(logits, labels, chunk_size=2)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def test_gradients_match_reference_through_chunk_checkpointing():
    torch.manual_seed(2)
    base = torch.randn(2, 6, 13, dtype=torch.float64)
    labels = _labels()
    a = base.clone().float().requires_grad_()
    token_logprobs(a, labels, chunk_size=2).sum().backward()
    b = base.clone().requires_grad_()
    _reference(b, labels)[0].sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=1e-6)
    # gradient reaches only positions that predict a label
    assert (a.grad[0, [0, 4, 5]] == 0).all()


def test_from_hidden_equals_full_logits_path_and_its_gradients():
    torch.manual_seed(3)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64)
    weight = torch.randn(17, 8, dtype=torch.float64)
    labels = _labels()
    h1, w1 = hidden.clone().float().requires_grad_(), weight.clone().float().requires_grad_()
    got = token_logprobs_from_hidden(h1, w1, labels, chunk_size=3)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected, _ = _reference(h2 @ w2.T, labels)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    got.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=0, atol=1e-5)


def test_all_masked_gives_zeros():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    labels = torch.full((1, 4), IGNORE_INDEX)
    out = token_logprobs(logits, labels)
    assert out.shape == (1, 3) and (out == 0).all()
