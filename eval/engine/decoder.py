"""Running the model one token at a time over a KV cache: the inner loop of eval/engine/generation.py.

Two decoders with one interface; the generation engine chooses:

`StaticDecoder`, for Llama-family models (Llama, Mistral, Qwen2 layouts, which
includes DeepSeek-Prover-V2-7B): a preallocated KV cache and a hand-written
forward pass over the model's own modules (so LoRA adapters apply), in the
spirit of gpt-fast. Every decode step has the same shapes, so on a GPU each
step is captured once as a CUDA graph and then replayed: one launch per token
instead of ~600 kernel launches issued from Python. Sampling (eval/engine/sampling.py)
runs inside the graph, so the host only reads the chosen tokens every few
steps. Decoding 16 rows is bound by reading the weights once per token, so
what remains is making every kernel count: the q, k and v projections run as
one matrix product over a fused copy of their weights, and the small
element-wise steps (residual add + RMSNorm, RoPE, SiLU·up, the sampler) are
each compiled into one kernel with torch.compile. The CPU runs exactly the
same step functions, uncompiled and without graphs.

`CacheDecoder`, for any other causal LM: the model's own forward and cache,
step by step, eagerly. Slower, but every architecture works.

The cache layout (StaticDecoder)::

    kv[layer, 0 or 1 (keys, values), slot, head, column, head_dim]

Prompts are left-padded to a common width W, so column c holds the same step
for every row: the prompt ends at column W − 1 and generated token i is written
at column W + i. Row r's real tokens start at column first[r]; a query may see
columns first[r] … its own. Decode steps attend over the first `kv_len`
columns only, rounded up to a multiple of `kv_block`, so the graphs are keyed
by (rows, kv_len, sampling) and are shared by all prompts, whatever their
length, until a batch needs more slots or columns than the cache has: then the
cache is allocated anew at the new size and the graphs are captured again
(`CapturedSteps`).

Interface (both decoders):

    start(prompts, expand, sampling, seeds, max_new)  prefill each distinct prompt once,
                                                       copy its cache to the rows that use it,
                                                       return the first token of every row
    run(steps)                                         decode `steps` tokens for every slot
    keep(slots)                                        drop finished rows: keep these slots, in order
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from twophase.data.base.compiling import compiled_or_eager
from twophase.data.base.model_api import causal_lm_of, forward_keywords
from twophase.data.tokens import left_pad
from twophase.eval.engine.sampling import SamplingParams, choose_tokens, vocabulary_keys

STATIC_MODEL_TYPES = ("llama", "mistral", "qwen2")
QKV = ("q_proj", "k_proj", "v_proj")
PREFILL_TOKENS = 16384  # prompt tokens per prefill forward: bounds its activations


def supports_static_decoding(model) -> bool:
    """True for the Llama-family layout that StaticDecoder's forward pass implements."""
    lm = causal_lm_of(model)
    config = getattr(lm, "config", None)
    inner = getattr(lm, "model", None)
    if getattr(config, "model_type", None) not in STATIC_MODEL_TYPES or inner is None:
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    return all(hasattr(inner, name) for name in needed) and hasattr(lm, "lm_head")


def bucket(n: int, limit: int) -> int:
    """The slot count used for n active rows: the next power of two, at most `limit`."""
    return min(limit, 1 << max(0, n - 1).bit_length())


class StaticDecoder:
    def __init__(self, model, max_batch: int, cuda_graphs: bool = True, kv_block: int = 64, storage=None):
        lm = causal_lm_of(model)
        inner = lm.model
        config = lm.config
        self.embed, self.layers, self.final_norm, self.rotary, self.head = (
            inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb, lm.lm_head,
        )  # fmt: skip
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim**-0.5
        self.device, self.dtype = self.embed.weight.device, self.embed.weight.dtype
        self.max_batch = max_batch
        self.kv_block = kv_block
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.storage = storage  # optional flat tensor to carve the cache from (trainers/infra/grad_arena.py)
        self.vocab_keys = vocabulary_keys(self.head.out_features, self.device)
        self.ops = FusedOps(compiled=self.use_graphs)
        self.fused_qkv = all(_fusable_linears(layer.self_attn, QKV) for layer in self.layers)
        self.qkv_biased = self.fused_qkv and self.layers[0].self_attn.q_proj.bias is not None  # Qwen2 has q, k, v biases
        self.capacity = self.cache_slots = 0
        self.kv = self.qkv_weight = self.qkv_bias = None
        self.graphs = CapturedSteps(self.use_graphs)
        self._state(max_batch)

    def _state(self, rows: int) -> None:
        """The per-slot tensors a decode step reads and updates in place (fixed addresses for the graphs)."""
        long = dict(dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(rows, **long)  # the last chosen token: the next step's input
        self.positions = torch.zeros(rows, **long)  # its position id
        self.first = torch.zeros(rows, **long)  # first real cache column of the row
        self.seeds = torch.zeros(rows, **long)
        self.column = torch.zeros(1, **long)  # cache column the next step writes
        self.index = torch.zeros(1, **long)  # generated-token index of the next choice (sampling noise)
        self.key_columns = torch.arange(0, **long)
        self.ring = 0
        self.ring_tokens = self.ring_logprobs = None

    # ------------------------------------------------------------------ cache

    def _reserve(self, slots: int, columns: int, ring: int) -> None:
        """Make sure the cache holds `slots` rows of `columns` columns; a new cache invalidates the captured graphs.

        The cache is sized by the batch that needs it, not by `max_batch`: an
        evaluation decodes 256 short rows in one benchmark and 64 long ones in
        the next, and 256 long rows would not fit in the card.
        """
        columns = math.ceil(columns / self.kv_block) * self.kv_block
        if slots > self.cache_slots or columns > self.capacity:
            self.graphs.drop()  # they read and write the old buffers
            self.kv = self.qkv_weight = self.qkv_bias = None  # free the old buffers first
            cache_shape = (len(self.layers), 2, slots, self.kv_heads, columns, self.head_dim)
            self.kv, rest = self._carve(cache_shape, self.storage)
            if self.fused_qkv:
                attn = self.layers[0].self_attn
                rows = attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features
                self.qkv_weight, _ = self._carve((len(self.layers), rows, attn.q_proj.in_features), rest)
                if self.qkv_biased:
                    self.qkv_bias = torch.empty((len(self.layers), rows), dtype=self.dtype, device=self.device)
            self.capacity, self.cache_slots = columns, slots
            self.key_columns = torch.arange(columns, dtype=torch.long, device=self.device)
        if ring > self.ring:
            self.graphs.drop()
            self.ring = ring
            self.ring_tokens = torch.zeros(self.max_batch, ring, dtype=torch.long, device=self.device)
            self.ring_logprobs = torch.zeros(self.max_batch, ring, dtype=torch.float32, device=self.device)

    def _carve(self, shape, storage):
        """A tensor of `shape` from the front of `storage` when it fits (returning the rest), else a new one."""
        numel = math.prod(shape)
        if storage is not None and storage.dtype == self.dtype and storage.numel() >= numel:
            return storage[:numel].view(shape), storage[numel:]
        return torch.empty(shape, dtype=self.dtype, device=self.device), None

    def _refresh_fused_weights(self) -> None:
        """Copy the current q, k, v weights (and biases) into the fused ones (training changes them between calls)."""
        if self.fused_qkv:
            for index, layer in enumerate(self.layers):
                projections = [getattr(layer.self_attn, name) for name in QKV]
                torch.cat([p.weight for p in projections], out=self.qkv_weight[index])
                if self.qkv_biased:
                    torch.cat([p.bias for p in projections], out=self.qkv_bias[index])

    # ------------------------------------------------------------------ the forward pass

    def _forward(self, x, cos, sin, mask, store) -> torch.Tensor:
        """The decoder over input embeddings x (b, t, hidden); returns the last position's logits (float32).

        Each layer: h = RMSNorm(x); x += attention(h); h = RMSNorm(x); x += MLP(h). The residual
        add of one block and the norm that follows it run as one fused operation.
        """
        ops = self.ops
        h = ops.rms_norm(x, self.layers[0].input_layernorm.weight, _eps(self.layers[0].input_layernorm))
        for index, layer in enumerate(self.layers):
            attention = self._attention(index, layer.self_attn, h, cos, sin, mask, store)
            norm = layer.post_attention_layernorm
            x, h = ops.add_rms_norm(x, attention, norm.weight, _eps(norm))
            norm = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else self.final_norm
            x, h = ops.add_rms_norm(x, self._mlp(layer.mlp, h), norm.weight, _eps(norm))
        return self.head(h[:, -1:])[:, -1].float()

    def _attention(self, index, attn, h, cos, sin, mask, store):
        b, t, _ = h.shape
        if self.fused_qkv:
            sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
            bias = self.qkv_bias[index] if self.qkv_biased else None
            q, k, v = torch.split(F.linear(h, self.qkv_weight[index], bias), sizes, dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.ops.rope(q, k, cos, sin)
        keys, values = store(index, k, v)
        extra = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, **extra)
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def _mlp(self, mlp, h):
        if _fusable_linears(mlp, ("gate_proj", "up_proj", "down_proj")) and isinstance(getattr(mlp, "act_fn", None), torch.nn.SiLU):
            return mlp.down_proj(self.ops.silu_mul(mlp.gate_proj(h), mlp.up_proj(h)))
        return mlp(h)

    # ------------------------------------------------------------------ prefill

    @torch.no_grad()
    def start(self, prompts: list[list[int]], expand: list[int], sampling: SamplingParams, seeds: list[int],
              max_new: int, ring: int) -> tuple[list[int], list[float]]:  # fmt: skip
        """Prefill the distinct `prompts`; row r continues prompts[expand[r]]. Returns the first tokens."""
        rows = len(expand)
        width = max(len(p) for p in prompts)
        slots = bucket(rows, self.max_batch)
        self._reserve(slots, width + max_new, ring)
        expand = expand + [expand[0]] * (slots - rows)  # filler slots copy row 0; their tokens are ignored
        self.kv[:, :, :slots, :, width:].zero_()  # columns not yet written must hold finite values
        self._refresh_fused_weights()
        logits = torch.cat([self._prefill(chunk, offset, expand, width) for chunk, offset in self._chunks(prompts, width)])
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        where = torch.tensor(expand, device=self.device)
        self.seeds[:slots] = torch.tensor(seeds + [seeds[0]] * (slots - rows), device=self.device)
        self.index.zero_()
        tokens, logprobs = self.ops.choose(logits[where], sampling, self.seeds[:slots], self.index, self.vocab_keys)
        self.tokens[:slots] = tokens
        self.positions[:slots] = lengths[where]
        self.first[:slots] = width - lengths[where]
        self.column.fill_(width)
        self.index.fill_(1)
        self.slots, self.host_column, self.generated = slots, width, 1
        return tokens[:rows].tolist(), logprobs[:rows].tolist()

    def _chunks(self, prompts, width):
        per_chunk = max(1, PREFILL_TOKENS // width)
        for offset in range(0, len(prompts), per_chunk):
            yield prompts[offset : offset + per_chunk], offset

    def _prefill(self, prompts, offset, expand, width) -> torch.Tensor:
        """Run the left-padded prompts, store their keys and values in every slot that uses them."""
        ids, mask, positions = left_pad(prompts, 0, self.device)  # pad id 0: masked, any valid id works
        ids, mask, positions = _pad_left_to(ids, mask, positions, width)
        n = len(prompts)
        targets = [(slot, unique - offset) for slot, unique in enumerate(expand) if offset <= unique < offset + n]
        slot_index = torch.tensor([s for s, _ in targets], device=self.device)
        source_index = torch.tensor([u for _, u in targets], device=self.device)
        x = self.embed(ids)
        cos, sin = self.rotary(x, positions)

        def store(index, k, v):
            self.kv[index, 0, :, :, :width].index_copy_(0, slot_index, k[source_index])
            self.kv[index, 1, :, :, :width].index_copy_(0, slot_index, v[source_index])
            return k, v

        return self._forward(x, cos, sin, _prefill_mask(mask, self.dtype), store)

    # ------------------------------------------------------------------ decode

    @torch.no_grad()
    def run(self, steps: int, sampling: SamplingParams) -> tuple[list[list[int]], list[list[float]]]:
        """Decode `steps` tokens for every slot; returns the chosen tokens and log-probs per slot."""
        start = self.generated
        for _ in range(steps):
            kv_len = min(self.capacity, math.ceil((self.host_column + 1) / self.kv_block) * self.kv_block)
            self._step(self.slots, kv_len, sampling)
            self.host_column += 1
        order = [(start + i) % self.ring for i in range(steps)]
        tokens = self.ring_tokens[: self.slots, order].tolist()
        logprobs = self.ring_logprobs[: self.slots, order].tolist()
        self.generated = start + steps  # the device's `index`, counted on the host too
        return tokens, logprobs

    def _step(self, slots: int, kv_len: int, sampling: SamplingParams) -> None:
        self.graphs.run((slots, kv_len, sampling), lambda: self._decode(slots, kv_len, sampling))

    def _decode(self, b: int, kv_len: int, sampling: SamplingParams) -> None:
        """One token for slots [0, b): forward, choose, and advance every state tensor in place."""
        x = self.embed(self.tokens[:b, None])
        cos, sin = self.rotary(x, self.positions[:b, None])
        columns = self.key_columns[:kv_len]
        visible = (columns[None, :] >= self.first[:b, None]) & (columns[None, :] <= self.column)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill(~visible, float("-inf"))

        def store(index, k, v):
            keys, values = self.kv[index, 0, :b], self.kv[index, 1, :b]
            keys.index_copy_(2, self.column, k)
            values.index_copy_(2, self.column, v)
            return keys[:, :, :kv_len], values[:, :, :kv_len]

        logits = self._forward(x, cos, sin, mask[:, None, None, :], store)
        tokens, logprobs = self.ops.choose(logits, sampling, self.seeds[:b], self.index, self.vocab_keys)
        slot = self.index % self.ring
        self.ring_tokens[:b].index_copy_(1, slot, tokens[:, None])
        self.ring_logprobs[:b].index_copy_(1, slot, logprobs[:, None])
        self.tokens[:b].copy_(tokens)
        self.positions[:b].add_(1)
        self.column.add_(1)
        self.index.add_(1)

    @torch.no_grad()
    def keep(self, slots: list[int]) -> None:
        """Move the slots still generating to the front and shrink to their bucket."""
        new = bucket(len(slots), self.max_batch)
        order = torch.tensor(slots + [slots[0]] * (new - len(slots)), device=self.device)
        for layer in range(len(self.layers)):  # one layer at a time: a small temporary
            self.kv[layer, :, :new] = self.kv[layer, :, order]
        for state in (self.tokens, self.positions, self.first, self.seeds, self.ring_tokens, self.ring_logprobs):
            state[:new] = state[order]
        self.slots = new


class CapturedSteps:
    """Decode steps captured as CUDA graphs, one per key, all in one private memory pool.

    `run(key, step)` replays the key's graph; the first time, it runs `step`
    eagerly (the real step, and the warm-up a capture needs) and then captures it.

    Why `drop` starts a new pool: PyTorch's pool handle is only an id. The
    caching allocator keeps a pool alive while some graph captured into it
    lives, and asserts that a capture into an existing id finds it alive
    (`it->second->use_count > 0`, CUDACachingAllocator.cpp). Once every graph
    of the pool is gone its memory stays reserved until freed, so the id is
    still known but dead, and capturing into it again crashed the process:
    a generating benchmark, then HumanEval's longer generation (a larger
    cache, so the graphs were dropped), then the first new capture. A new
    round of captures therefore gets a new id, and the dead pool's memory is
    given back at once.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle() if enabled else None

    def run(self, key, step) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        step()
        if self.enabled:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):  # records the step; runs nothing
                step()
            self.graphs[key] = graph

    def drop(self) -> None:
        """Forget every graph (the buffers they use are about to change); later captures use a new pool."""
        if not self.graphs:
            return  # nothing was captured into the pool: it is still unused, and reusable
        self.graphs.clear()
        if self.enabled:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the dead pool's blocks
            self.pool = torch.cuda.graph_pool_handle()

    def __len__(self) -> int:
        return len(self.graphs)


class CacheDecoder:
    """Any causal LM: its own forward pass and KV cache, one eager call per token."""

    def __init__(self, model, max_batch: int):
        self.model = model
        lm = causal_lm_of(model)
        self.cache_kw, self.keep_kw = forward_keywords(model)  # transformers >= 5.24 says `cache`
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.vocab_keys = vocabulary_keys(lm.get_output_embeddings().out_features, self.device)

    def _forward(self, ids, mask, positions, cache):
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if self.keep_kw:
            kwargs[self.keep_kw] = 1
        out = self.model(**kwargs)
        return out.logits[:, -1].float(), getattr(out, self.cache_kw, None)

    @torch.no_grad()
    def start(self, prompts, expand, sampling, seeds, max_new, ring):
        ids, mask, positions = left_pad(prompts, 0, self.device)
        logits, cache = self._forward(ids, mask, positions, None)
        where = torch.tensor(expand, device=self.device)
        cache.reorder_cache(where)
        self.cache, self.mask = cache, mask[where]
        self.positions = positions[where, -1] + 1
        self.seeds = torch.tensor(seeds, device=self.device)
        tokens, logprobs = choose_tokens(logits[where], sampling, self.seeds, torch.tensor(0, device=self.device), self.vocab_keys)
        self.tokens = tokens
        self.generated = 1
        return tokens.tolist(), logprobs.tolist()

    @torch.no_grad()
    def run(self, steps, sampling):
        chosen, chosen_logprobs = [], []
        for _ in range(steps):
            self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.mask), 1))], dim=1)
            logits, self.cache = self._forward(self.tokens[:, None], self.mask, self.positions[:, None], self.cache)
            index = torch.tensor(self.generated, device=self.device)
            self.tokens, logprobs = choose_tokens(logits, sampling, self.seeds, index, self.vocab_keys)
            self.positions = self.positions + 1
            self.generated += 1
            chosen.append(self.tokens)
            chosen_logprobs.append(logprobs)
        return torch.stack(chosen, 1).tolist(), torch.stack(chosen_logprobs, 1).tolist()

    @torch.no_grad()
    def keep(self, slots):
        where = torch.tensor(slots, device=self.device)
        self.cache.reorder_cache(where)
        self.mask, self.positions, self.seeds, self.tokens = (t[where] for t in (self.mask, self.positions, self.seeds, self.tokens))


def _pad_left_to(ids, mask, positions, width):
    """Widen left-padded tensors to `width` columns."""
    extra = width - ids.shape[1]
    if extra <= 0:
        return ids, mask, positions
    pad = lambda t: F.pad(t, (extra, 0), value=0)  # noqa: E731
    return pad(ids), pad(mask), pad(positions)


def _prefill_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: causal, no padding keys; a padding query sees itself (no empty softmax)."""
    width = mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None] & mask.bool()[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool, device=mask.device)[None]
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, float("-inf"))[:, None]


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def rms_norm(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(x, update, weight, eps):
    """The residual stream after adding `update`, and its RMSNorm (the next block's input)."""
    x = x + update
    return x, F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope(q, k, cos, sin):
    """Rotary position embedding of queries and keys (b, heads, t, d) with cos, sin of shape (b, t, d)."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_mul(gate, up):
    return F.silu(gate) * up


class FusedOps:
    """The decoder's element-wise steps: plain functions, or each compiled into one GPU kernel.

    torch.compile fuses what eager PyTorch runs as 5–10 small kernels (e.g. the add,
    the float32 upcast, the mean of squares and the scaling of RMSNorm). The
    compiled code is captured into the CUDA graphs like any other kernel. If
    compilation fails (no Triton on this machine, say), the plain functions run.
    """

    def __init__(self, compiled: bool):
        for name, fn in (("rms_norm", rms_norm), ("add_rms_norm", add_rms_norm), ("rope", rope),
                         ("silu_mul", silu_mul), ("_choose", choose_tokens)):  # fmt: skip
            setattr(self, name, compiled_or_eager(fn) if compiled else fn)

    def choose(self, logits, sampling, seeds, index, vocab_keys):
        # The top-p filter's sort and cumulative sum stay eager: Inductor cannot always generate its scan.
        choose = choose_tokens if sampling.top_p < 1 else self._choose
        return choose(logits, sampling, seeds, index, vocab_keys)


def _eps(norm) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def _fusable_linears(module, names) -> bool:
    """Whether these sub-modules are plain nn.Linear layers (no LoRA wrapper), all with a bias or all without:
    q, k and v may then run as one fused product, and the MLP's SiLU·up as one compiled kernel."""
    layers = [getattr(module, n, None) for n in names]
    return all(type(layer) is torch.nn.Linear for layer in layers) and len({layer.bias is None for layer in layers}) == 1
