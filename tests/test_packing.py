"""Packed rows (data/packing.py), pass grouping, and packed attention against the two-row layout.

The layouts are compared in float64 on the tiny model, so any difference beyond
rounding is a wrong mask, a wrong position or a wrong label.
"""

from __future__ import annotations

import pytest
import torch

from twophase.data.collators import TokenizedPair, collate_pairs, split_into_passes, truncate_pair
from twophase.data.packing import group_by_token_budget, pack_pairs
from twophase.trainers.dpo import pair_logprobs_of
from twophase.trainers.infra.packed_attention import use_packed_attention

X = -100  # no label


def test_packed_row_by_hand():
    batch = pack_pairs([TokenizedPair([1, 10], [20, 2], [30, 31, 2]), TokenizedPair([1], [21], [2])], share_prompt=False)
    assert batch["input_ids"].tolist() == [[1, 10, 20, 2, 1, 10, 30, 31, 2, 1, 21, 1, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 0, 1]]
    assert batch["pair_of_token"].tolist() == [[0] * 9 + [1] * 4]
    assert batch["chosen_labels"].tolist() == [[X, X, 20, 2, X, X, X, X, X, X, 21, X, X]]
    assert batch["rejected_labels"].tolist() == [[X, X, X, X, X, X, 30, 31, 2, X, X, X, 2]]
    assert batch["cu_seq_q"].tolist() == batch["cu_seq_k"].tolist() == [0, 4, 9, 11, 13]
    assert "key_index" not in batch and (batch["max_q"], batch["max_k"]) == (5, 5)
    assert batch["num_pairs"] == 2 and batch["pair_tokens"] == (4 + 2 + 3) + (2 + 1 + 1)


def test_packed_shared_prompt_row_by_hand():
    pairs = [TokenizedPair([1, 10, 11], [20, 2], [30, 2]), TokenizedPair([1], [], [31, 32, 2])]
    batch = pack_pairs(pairs, share_prompt=True)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 20, 2, 30, 2, 1, 31, 32, 2]]
    # the rejected reply continues from the prompt: positions 3, 4 like the chosen reply
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 0, 1, 2, 3]]
    assert batch["chosen_labels"].tolist() == [[X, X, X, 20, 2, X, X, X, X, X, X]]
    # the first rejected token sits where the last prompt token's state predicts it (position 3),
    # and with an empty chosen reply that is simply the rejected reply's own first position
    assert batch["rejected_labels"].tolist() == [[X, X, X, 30, X, X, 2, X, 31, 32, 2]]
    # segments: [P C] of pair 0, [R] of pair 0 seeing [P R], then pair 1's [P] and [R] seeing [P R]
    assert batch["cu_seq_q"].tolist() == [0, 5, 7, 8, 11]
    assert batch["key_index"].tolist() == [0, 1, 2, 3, 4] + [0, 1, 2, 5, 6] + [7] + [7, 8, 9, 10]
    assert batch["cu_seq_k"].tolist() == [0, 5, 10, 11, 15]
    assert (batch["max_q"], batch["max_k"]) == (5, 5)
    assert batch["pair_tokens"] == (2 * 3 + 2 + 2) + (2 * 1 + 0 + 3)


def test_a_pair_without_a_prompt_token_cannot_be_packed():
    with pytest.raises(ValueError, match="empty prompt"):
        pack_pairs([TokenizedPair([], [5, 2], [6, 2])], share_prompt=True)


def test_token_budget_groups_are_consecutive_and_full():
    assert group_by_token_budget([5, 3, 2, 7, 1, 10], budget=10) == [[0, 1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="does not fit"):
        group_by_token_budget([5, 11], budget=10)


def test_passes_by_pair_count_or_by_tokens():
    pairs = [TokenizedPair([1] * p, [2] * c, [3] * r) for p, c, r in [(4, 2, 2), (3, 1, 1), (1, 6, 1), (2, 2, 2)]]
    assert split_into_passes(pairs, "stacked", pairs_per_pass=3, tokens_per_pass=0) == [[0, 1, 2], [3]]
    # shared: 8, 5, 8, 6 tokens; separate: 12, 8, 9, 8
    assert split_into_passes(pairs, "packed_shared_prompt", pairs_per_pass=0, tokens_per_pass=14) == [[0, 1], [2, 3]]
    assert split_into_passes(pairs, "packed", pairs_per_pass=0, tokens_per_pass=20) == [[0, 1], [2, 3]]


def _random_ids(generator, n):
    return torch.randint(3, 400, (n,), generator=generator).tolist()


def _edge_case_pairs():
    """Pairs cut by the truncation limits (max_length 40, prompt 24), an empty reply on either side, one-token prompts."""
    g = torch.Generator().manual_seed(0)
    raw = [
        ([1, *_random_ids(g, 6)], [*_random_ids(g, 4), 2], [*_random_ids(g, 9), 2]),
        ([1, *_random_ids(g, 50)], [*_random_ids(g, 5), 2], [*_random_ids(g, 3), 2]),  # prompt cut to 24, BOS kept
        ([1, *_random_ids(g, 30)], [*_random_ids(g, 30), 2], [*_random_ids(g, 2), 2]),  # replies cut to 16
        ([1, *_random_ids(g, 2)], [], [*_random_ids(g, 3), 2]),  # empty chosen reply
        ([1], [*_random_ids(g, 5), 2], []),  # one-token prompt, empty rejected reply
    ]
    pairs = [truncate_pair(TokenizedPair(*pair), max_length=40, max_prompt_length=24, bos_id=1) for pair in raw]
    assert [tuple(map(len, p)) for p in pairs] == [(7, 5, 10), (24, 6, 4), (24, 16, 3), (3, 0, 4), (1, 6, 0)]
    return pairs


@pytest.fixture()
def float64_models(tiny_model_dir):
    """Two copies of the tiny model in float64, with every weight perturbed: one plain, one on packed attention."""
    from transformers import AutoModelForCausalLM

    models = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)  # sharper attention than at initialisation
        models.append(model.eval())
    use_packed_attention(models[1])
    return models


@pytest.mark.parametrize("layout", ["shared_prompt", "packed", "packed_shared_prompt"])
def test_every_layout_gives_the_stacked_logprobs_and_gradients_in_float64(float64_models, layout):
    plain, packed = float64_models
    pairs = _edge_case_pairs()
    weights = torch.arange(1.0, 2 * len(pairs) + 1, dtype=torch.float64)  # every log-probability counts differently

    expected = pair_logprobs_of(plain, collate_pairs(pairs, "stacked", pad_id=0), "stacked", chunk_size=7)
    (expected * weights).sum().backward()
    model = packed if layout.startswith("packed") else plain
    expected_grads = {name: p.grad.clone() for name, p in plain.named_parameters()}
    plain.zero_grad()

    got = pair_logprobs_of(model, collate_pairs(pairs, layout, pad_id=0), layout, chunk_size=7)
    (got * weights).sum().backward()

    assert expected[3] == 0 and expected[9] == 0  # the empty replies
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    for name, p in model.named_parameters():
        assert relative_error(p.grad, expected_grads[name]) < GRADIENT_TOLERANCE, name


# Llama's RMSNorm computes in float32 even in a float64 model. When the two replies' gradients
# meet at a shared prompt before a norm, instead of passing through it one by one, they round
# differently there: gradients agree to ~5e-8 relative, the float32 floor. A wrong mask,
# position or label is off by far more than 1e-6.
GRADIENT_TOLERANCE = 1e-6


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def test_a_packed_model_refuses_a_call_without_segments(float64_models):
    _, packed = float64_models
    with pytest.raises(RuntimeError, match="packed_segments"):
        packed(torch.tensor([[1, 5, 6]]))


def _kernel_emulation(bottom_right: bool):
    """A stand-in for the GPU kernel on the CPU: exact segments in float32, causal aligned as asked."""
    import torch.nn.functional as F

    def attend(q, k, v, segments, scale):
        pieces = []
        q_cut, k_cut = segments.cu_seq_q.tolist(), segments.cu_seq_k.tolist()
        for q0, q1, k0, k1 in zip(q_cut, q_cut[1:], k_cut, k_cut[1:]):
            shift = (k1 - k0) - (q1 - q0) if bottom_right else 0
            allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool).tril(diagonal=shift)
            inputs = (x.float().transpose(0, 1) for x in (q[q0:q1], k[k0:k1], v[k0:k1]))
            out = F.scaled_dot_product_attention(*inputs, attn_mask=allowed, scale=scale)
            pieces.append(out.transpose(0, 1).to(q.dtype))
        return torch.cat(pieces)

    return attend


def test_the_kernel_check_passes_a_right_kernel_and_stops_a_wrong_one(monkeypatch):
    import twophase.trainers.infra.packed_attention as packed_attention
    from twophase.data.base.errors import UserError

    monkeypatch.setattr(packed_attention, "_kernel_applies", lambda q: q.dtype == torch.bfloat16)
    monkeypatch.setattr(packed_attention, "_flash_varlen", _kernel_emulation(bottom_right=True))
    assert packed_attention.verify_packed_attention(torch.device("cpu")) < 0.05  # bf16 rounding only

    monkeypatch.setattr(packed_attention, "_flash_varlen", _kernel_emulation(bottom_right=False))
    with pytest.raises(UserError, match="disagrees with the reference"):
        packed_attention.verify_packed_attention(torch.device("cpu"))

    def missing_kernel(*args):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(packed_attention, "_flash_varlen", missing_kernel)
    with pytest.raises(UserError, match="Ampere GPUs or newer.*use layout: shared_prompt"):
        packed_attention.verify_packed_attention(torch.device("cpu"))


def test_causal_masking_is_asked_for_in_each_torch_releases_words():
    """torch 2.10 named it is_causal=True; 2.11 on, window_size=(-1, 0); grouped-query attention where offered."""
    from twophase.trainers.infra.packed_attention import _varlen_options

    def release_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None, scale=None):
        pass

    def release_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False):  # fmt: skip
        pass

    assert _varlen_options(release_2_10, grouped=True) == {"is_causal": True}
    assert _varlen_options(release_2_13, grouped=False) == {"window_size": (-1, 0)}
    assert _varlen_options(release_2_13, grouped=True) == {"window_size": (-1, 0), "enable_gqa": True}
