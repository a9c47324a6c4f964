"""Batched sampling with a preallocated key/value cache that is kept between turns.

Why this file exists: in a negotiation every turn's prompt is the previous turn's prompt plus
a few new messages. `model.generate` re-reads the whole prompt every turn; on a 2-core CPU that
prefill costs several times more than the reply itself. Here each sequence keeps the keys and
values of the tokens it has already seen, and a new turn only runs the tokens after the longest
common prefix with what is cached (typically the other side's reply and the new emotion block).

The forward pass is written out for the Llama family (Llama, SmolLM, Mistral, Qwen2): it calls
the model's own modules (norms, projections, MLP, rotary embedding), so trained LoRA layers are
used as they are, and it is checked against the Hugging Face forward in tests/test_decode.py.
Other architectures fall back to `model.generate` (see LMAgent in negotiate.py).

Layout of one batched call (B sequences, P_b cached tokens, S_b new prompt tokens):

    columns: [ pad | cached_b (P_b) ][ pad | new_b (S_b) ][ generated ... ]
             <------- maxP --------><------- maxS ------><-- max_new -->

Pads are masked out, positions are explicit (P_b + i), so rows of different lengths share
one preallocated cache tensor per layer and the newest token of every row is the last column.
Rows are ordered by their count of new tokens and the prompt is run in chunks of rows of
similar length (each chunk only as wide as its longest row), so a batch with a few long new
prompts does not pad every other row to their length.
Once half the rows of a call have produced their end token, those rows are handed back and
dropped from the batch, so a call does not keep paying for replies that have already ended.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")


def supports(model):
    return getattr(model.config, "model_type", None) in SUPPORTED and hasattr(model.model, "rotary_emb")


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope(x, cos, sin):                       # x: B,h,S,hd ; cos/sin: B,S,hd
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class KVCache:
    """Keys and values of one sequence: ids (list of token ids) and kv [layers, 2, kv_heads, n, head_dim]."""

    __slots__ = ("ids", "kv")

    def __init__(self, ids, kv):
        self.ids, self.kv = ids, kv


def prefill_chunks(lengths, overhead=64):
    """Split rows sorted by new-token count (ascending) into contiguous chunks for prefill.
    A chunk runs (rows x its longest row) tokens, so one chunk for everything pays for the
    padding of every short row; each extra chunk costs one more pass through the layers,
    counted as `overhead` tokens. Exact minimum by dynamic programming (B is at most a few
    hundred). Returns [(start, end), ...] covering range(len(lengths))."""
    n = len(lengths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for b in range(1, n + 1):
        for a in range(b):
            c = best[a] + (b - a) * lengths[b - 1] + overhead
            if c < best[b]:
                best[b], cut[b] = c, a
    out, b = [], n
    while b:
        out.append((cut[b], b))
        b = cut[b]
    return out[::-1]


def common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVDecoder:
    """Sampling (temperature -> top-k -> top-p, as `generate` does) or greedy decoding for a
    Llama-family model, reusing each sequence's cache from its previous call."""

    def __init__(self, model, eos_ids, max_new_tokens=48, temperature=0.7, top_p=0.9, top_k=50):
        self.model, self.eos = model, torch.tensor(sorted(set(eos_ids)))
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        c = model.config
        self.n_layers = c.num_hidden_layers
        self.n_heads = c.num_attention_heads
        self.n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.prefill_overhead = 64      # one extra prefill pass, in tokens (prefill_chunks)
        # running totals, read by the benchmark: tokens and seconds of prefill and of decoding
        self.reused_tokens = self.prefilled_tokens = self.decoded_tokens = 0
        self.prefill_seconds = self.decode_seconds = 0.0

    # -- the forward pass ---------------------------------------------------------------
    def _forward(self, ids, pos, K, V, valid, c0):
        """Run tokens `ids` (B,S) at positions `pos` (B,S), writing their keys/values into
        columns [c0, c0+S) of K/V (lists over layers of B,kv,T,hd). Returns last-position logits."""
        m = self.model.model
        B, S = ids.shape
        c1 = c0 + S
        h = m.embed_tokens(ids)                                            # B,S,D
        cos, sin = m.rotary_emb(h, pos)                                    # B,S,hd
        cols = torch.arange(c1, device=ids.device)
        causal = cols[None, :] <= (c0 + torch.arange(S, device=ids.device))[:, None]   # S,c1
        mask = valid[:, None, None, :c1] & causal[None, None]              # B,1,S,c1
        mask = mask | (cols[None, None, None, :] == (c0 + torch.arange(S, device=ids.device))[None, None, :, None])
        for li, layer in enumerate(m.layers):
            attn = layer.self_attn
            r = layer.input_layernorm(h)
            q = attn.q_proj(r).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)   # B,H,S,hd
            k = attn.k_proj(r).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)      # B,kv,S,hd
            v = attn.v_proj(r).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            K[li][:, :, c0:c1] = k
            V[li][:, :, c0:c1] = v
            if S == 1 and self.n_kv != self.n_heads:
                # one new token: the query heads that share a key/value head become that head's
                # query rows, so keys/values are read once per group instead of once per head
                g = self.n_heads // self.n_kv
                o = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, g, self.head_dim), K[li][:, :, :c1],
                                                   V[li][:, :, :c1], attn_mask=mask, scale=attn.scaling)  # B,kv,g,hd
                o = o.reshape(B, self.n_heads, 1, self.head_dim)                                         # B,H,1,hd
            else:
                o = F.scaled_dot_product_attention(q, K[li][:, :, :c1], V[li][:, :, :c1], attn_mask=mask,
                                                   scale=attn.scaling, enable_gqa=self.n_kv != self.n_heads)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(m.norm(h[:, -1]))                       # B,V

    # -- sampling -----------------------------------------------------------------------
    def _sample(self, logits, gen):
        logits = logits.float()
        if self.temperature <= 0:
            return logits.argmax(-1)
        vals, idx = torch.topk(logits / self.temperature, min(self.top_k, logits.shape[-1]), dim=-1)
        probs = vals.softmax(-1)                                           # sorted, descending
        drop = probs.cumsum(-1) - probs > self.top_p                       # keep the top-p nucleus
        probs = probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen)
        return idx.gather(-1, choice).squeeze(-1)

    # -- one batched call ---------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts, caches=None, generator=None):
        """prompts: list of token-id lists; caches: list of KVCache or None (one per prompt).
        Returns (new token ids per prompt, up to and including EOS; updated KVCache per prompt)."""
        B = len(prompts)
        caches = caches or [None] * B
        p0 = next(self.model.parameters())
        dev, dt = p0.device, p0.dtype
        reuse = []
        for ids, c in zip(prompts, caches):
            n = common_prefix(c.ids, ids) if c is not None else 0
            reuse.append(min(n, len(ids) - 1))                              # keep >= 1 new token
        # rows ordered by their count of new tokens, so that prefill can run in chunks of
        # similar length (prefill_chunks); `rows` maps each row back to its prompt
        order = sorted(range(B), key=lambda b: (len(prompts[b]) - reuse[b], b))
        prompts_in, caches_in, reuse_in = prompts, caches, reuse
        prompts, caches, reuse = [prompts_in[b] for b in order], [caches_in[b] for b in order], [reuse_in[b] for b in order]
        new = [len(ids) - n for ids, n in zip(prompts, reuse)]
        maxP, maxS = max(reuse), max(new)
        T = maxP + maxS + self.max_new_tokens
        K = [torch.zeros(B, self.n_kv, T, self.head_dim, device=dev, dtype=dt) for _ in range(self.n_layers)]
        V = [torch.zeros_like(K[0]) for _ in range(self.n_layers)]
        valid = torch.zeros(B, T, dtype=torch.bool, device=dev)
        ids = torch.zeros(B, maxS, dtype=torch.long, device=dev)
        pos = torch.zeros(B, maxS, dtype=torch.long, device=dev)
        for b, (p, n, s, c) in enumerate(zip(prompts, reuse, new, caches)):
            if n:
                kv = c.kv[:, :, :, :n].to(dev, dt)                          # L,2,kv,n,hd
                for li in range(self.n_layers):
                    K[li][b, :, maxP - n:maxP] = kv[li, 0]
                    V[li][b, :, maxP - n:maxP] = kv[li, 1]
                valid[b, maxP - n:maxP] = True
            ids[b, maxS - s:] = torch.tensor(p[n:], device=dev)
            pos[b, maxS - s:] = torch.arange(n, n + s, device=dev)
            valid[b, maxP + maxS - s:maxP + maxS] = True
        self.reused_tokens += sum(reuse)
        self.prefilled_tokens += sum(new)
        t0 = time.perf_counter()
        logits = []
        for a, b in prefill_chunks(new, self.prefill_overhead):                 # each chunk: its rows, its longest row's columns
            S = new[b - 1]
            logits.append(self._forward(ids[a:b, maxS - S:], pos[a:b, maxS - S:], [k[a:b] for k in K],
                                        [v[a:b] for v in V], valid[a:b], maxP + maxS - S))
        logits = torch.cat(logits)                                         # B,V
        t1 = time.perf_counter()
        next_pos = torch.tensor([n + s for n, s in zip(reuse, new)], device=dev)
        eos = self.eos.to(dev)
        out = torch.zeros(B, self.max_new_tokens, dtype=torch.long, device=dev)
        lengths = torch.full((B,), self.max_new_tokens, dtype=torch.long, device=dev)
        rows = torch.tensor(order, device=dev)       # which prompt each row of K/V/valid/logits is
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        new_tokens, new_caches = [None] * B, [None] * B

        def hand_back(local, b, stored):
            """Row `local` (prompt b) is finished: its tokens and its cache (the valid columns
            before `stored`, in order: prompt + generated tokens that have keys/values)."""
            gen = out[b, :int(lengths[b])].tolist()
            cols = valid[local, :stored].nonzero().squeeze(-1)
            seq = prompts_in[b] + gen
            keep = cols[:len(seq)]
            kv = torch.stack([torch.stack((K[li][local][:, keep], V[li][local][:, keep]))
                              for li in range(self.n_layers)])             # L,2,kv,n,hd
            new_tokens[b] = gen
            new_caches[b] = KVCache(seq[:kv.shape[3]], kv)

        for t in range(self.max_new_tokens):
            tok = self._sample(logits, generator)                          # rows
            out[rows, t] = tok
            hit = torch.isin(tok, eos) & ~done
            self.decoded_tokens += int((~done).sum())  # tokens of rows still generating
            lengths[rows[hit]] = t + 1
            done |= hit
            stored = maxP + maxS + t                 # columns with keys/values so far
            if bool(done.all()) or t + 1 == self.max_new_tokens:
                break
            if int(done.sum()) * 2 >= len(rows):     # most rows finished: hand them back, drop them
                for local in done.nonzero().squeeze(-1).tolist():
                    hand_back(local, int(rows[local]), stored)
                keep = (~done).nonzero().squeeze(-1)
                K, V = [k[keep] for k in K], [v[keep] for v in V]
                valid, rows, next_pos, tok = valid[keep], rows[keep], next_pos[keep], tok[keep]
                done = done[keep]
            c = maxP + maxS + t
            valid[:, c] = True
            logits = self._forward(tok[:, None], next_pos[:, None], K, V, valid, c)
            next_pos += 1
        self.prefill_seconds += t1 - t0
        self.decode_seconds += time.perf_counter() - t1
        for local, b in enumerate(rows.tolist()):
            hand_back(local, b, stored)
        return new_tokens, new_caches
