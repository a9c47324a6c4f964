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
one preallocated cache tensor and the newest token of every row is the last column.
Rows are ordered by their count of new tokens and the prompt is run in chunks of rows of
similar length (each chunk only as wide as its longest row), so a batch with a few long new
prompts does not pad every other row to their length.
Once half the rows of a call have produced their end token, those rows are handed back and
dropped from the batch, so a call does not keep paying for replies that have already ended.

The static decoding step (`static=True`, or EMODISTILL_STATIC_DECODE=1; off by default until a
device check has run it on a GPU): on a GPU the step above is launch-bound (about 2 ms a
layer whatever the batch on an H100, docs/notebook.md entry 22), because every step has new
shapes and hundreds of small kernels launched from Python. The static step keeps every shape
fixed so that it can be captured once in a CUDA graph and replayed: the keys/values live in one preallocated buffer per decoder, [layers, 2, rows,
kv_heads, columns, head_dim], reused from call to call (grown when a call needs more); the
step reads its token, position and column from fixed input tensors and writes the new keys
and values into that column with `index_copy_`; it attends to a fixed width (the columns so
far, rounded up to STATIC_BLOCK; masked columns weigh exactly 0) over a fixed count of rows
(`row_bucket`: the live rows rounded up, the extra rows computed and ignored). One graph is
captured for each (rows, width) met, after a warm-up on a side stream, and kept while the
buffers and the model's weights stay where they are. Sampling and the end-of-reply
bookkeeping stay outside the graph. On a CPU the same static step runs without a graph
(`static=True` there is how tests/test_decode.py checks it against the step above); the
default on a CPU stays the step above, which reads only the columns so far.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")
STATIC_BLOCK = 128       # a static decoding step attends to a multiple of this many columns
STATIC_GROW = 512        # the static buffers' columns grow in multiples of this


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


def row_bucket(n):
    """Rows a static decoding step runs for n live rows: 1, 2, 4, 8, then the next of 12, 16,
    24, 32, 48, 64, 96, 128, ...: at most n / 2 + 1 padding rows, and few distinct graphs."""
    if n <= 8:
        return 1 << max(n - 1, 0).bit_length()
    p = 1 << (n - 1).bit_length()
    return p * 3 // 4 if n <= p * 3 // 4 else p


def _round_up(n, k):
    return -(-n // k) * k


def _sync(dev):
    if dev.type == "cuda":          # CUDA runs asynchronously: time what the GPU did, not the launches
        torch.cuda.synchronize(dev)


def common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVDecoder:
    """Sampling (temperature -> top-k -> top-p, as `generate` does) or greedy decoding for a
    Llama-family model, reusing each sequence's cache from its previous call.

    static: the static decoding step (module docstring): None = off unless
    EMODISTILL_STATIC_DECODE=1 (it has not run on a GPU yet: until a device check has shown it
    exact and faster there, the eager step stays the default everywhere), True, False. graphs: capture that step in CUDA
    graphs; None = wherever it is static and on CUDA. The device is read here, so build the
    decoder after moving the model."""

    def __init__(self, model, eos_ids, max_new_tokens=48, temperature=0.7, top_p=0.9, top_k=50, static=None,
                 graphs=None):
        self.model, self.eos = model, torch.tensor(sorted(set(eos_ids)))
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        c = model.config
        self.n_layers = c.num_hidden_layers
        self.n_heads = c.num_attention_heads
        self.n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.prefill_overhead = 64      # one extra prefill pass, in tokens (prefill_chunks)
        cuda = next(model.parameters()).device.type == "cuda"
        if static is None:
            env = os.environ.get("EMODISTILL_STATIC_DECODE", "")
            static = env == "1"
        graphs = static and cuda if graphs is None else graphs
        if graphs and not (static and cuda):
            raise ValueError("CUDA graphs need static=True and the model on a CUDA device")
        self.static, self.graphs = bool(static), bool(graphs)
        self._buf = None                # the static buffers (_static_buffers)
        self._graphs, self._pool, self._sig = {}, None, None
        # running totals, read by the benchmark: tokens and seconds of prefill and of decoding,
        # decoding steps (forward passes of one token a row), CUDA graphs captured and their seconds
        self.reused_tokens = self.prefilled_tokens = self.decoded_tokens = self.decode_steps = 0
        self.prefill_seconds = self.decode_seconds = 0.0
        self.graph_captures, self.capture_seconds = 0, 0.0

    # -- the forward pass ---------------------------------------------------------------
    def _forward(self, ids, pos, K, V, valid, c0):
        """Run tokens `ids` (B,S) at positions `pos` (B,S), writing their keys/values into
        columns [c0, c0+S) of K/V (per layer: B,kv,T,hd). Returns last-position logits."""
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
            if S == 1:
                o = self._attend_one(q, K[li][:, :, :c1], V[li][:, :, :c1], mask, attn.scaling)
            else:
                o = F.scaled_dot_product_attention(q, K[li][:, :, :c1], V[li][:, :, :c1], attn_mask=mask,
                                                   scale=attn.scaling, enable_gqa=self.n_kv != self.n_heads)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(m.norm(h[:, -1]))                       # B,V

    def _attend_one(self, q, K, V, mask, scale):
        """Attention of one new token a row: q B,H,1,hd over K/V B,kv,T,hd, mask B,1,1,T."""
        if self.n_kv == self.n_heads:
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=scale)
        # the query heads that share a key/value head become that head's query rows, so
        # keys/values are read once per group instead of once per head
        B, g = q.shape[0], self.n_heads // self.n_kv
        o = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, g, self.head_dim), K, V, attn_mask=mask,
                                           scale=scale)                                      # B,kv,g,hd
        return o.reshape(B, self.n_heads, 1, self.head_dim)                                  # B,H,1,hd

    # -- the static decoding step ---------------------------------------------------------
    def _static_buffers(self, B, T, dev, dt):
        """The buffers of the static step, at least B rows (bucketed) and T columns, valid
        cleared. Reallocated (and every graph dropped) only to grow; graphs are also dropped
        when the model's tensors moved, its mode changed, or a LoRA layer was merged or unmerged
        (a graph replays the kernels and addresses it was captured with)."""
        model = self.model
        sig = (model.training, tuple(t.data_ptr() for t in model.parameters()),
               tuple(t.data_ptr() for t in model.buffers()),
               tuple(getattr(mod, "merged", None) for mod in model.modules() if hasattr(mod, "lora_A")))
        if sig != self._sig:
            self._drop_graphs()
            self._sig = sig
        buf = self._buf
        if buf is None or buf.kv.shape[2] < B or buf.kv.shape[4] < T or buf.kv.device != dev or buf.kv.dtype != dt:
            rows, cols = row_bucket(B), _round_up(T, STATIC_GROW)
            if buf is not None and buf.kv.device == dev and buf.kv.dtype == dt:
                rows, cols = max(rows, buf.kv.shape[2]), max(cols, buf.kv.shape[4])
            self._drop_graphs()
            self._buf = buf = None                                          # free the old buffers first
            self._buf = buf = SimpleNamespace(
                kv=torch.zeros(self.n_layers, 2, rows, self.n_kv, cols, self.head_dim, device=dev, dtype=dt),
                valid=torch.zeros(rows, cols, dtype=torch.bool, device=dev),
                tok=torch.zeros(rows, dtype=torch.long, device=dev),        # the step's inputs
                pos=torch.zeros(rows, dtype=torch.long, device=dev),
                col=torch.zeros(1, dtype=torch.long, device=dev))
        buf.valid.zero_()
        return buf

    def _drop_graphs(self):
        self._graphs.clear()
        self._pool = None

    def _step(self, b, w):
        """One decoding step of rows [0, b) of the static buffers: token buf.tok, position
        buf.pos, its keys/values written into column buf.col, attention over columns [0, w).
        Every shape is fixed by (b, w) and nothing waits for the host: capturable."""
        m, buf = self.model.model, self._buf
        ids, pos, valid = buf.tok[:b, None], buf.pos[:b, None], buf.valid[:b]            # B,1 ; B,1 ; B,T
        valid.index_fill_(1, buf.col, True)
        h = m.embed_tokens(ids)                                                          # B,1,D
        # the mask as SDPA would turn a boolean one into (0 or -inf), once for all layers
        mask = torch.zeros((b, 1, 1, w), dtype=h.dtype, device=h.device).masked_fill_(
            ~valid[:, None, None, :w], float("-inf"))                                    # B,1,1,w
        cos, sin = m.rotary_emb(h, pos)
        for li, layer in enumerate(m.layers):
            attn = layer.self_attn
            r = layer.input_layernorm(h)
            q = attn.q_proj(r).view(b, 1, self.n_heads, self.head_dim).transpose(1, 2)   # B,H,1,hd
            k = attn.k_proj(r).view(b, 1, self.n_kv, self.head_dim).transpose(1, 2)      # B,kv,1,hd
            v = attn.v_proj(r).view(b, 1, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            K, V = buf.kv[li, 0, :b], buf.kv[li, 1, :b]                                  # B,kv,T,hd
            K.index_copy_(2, buf.col, k)
            V.index_copy_(2, buf.col, v)
            o = self._attend_one(q, K[:, :, :w], V[:, :, :w], mask, attn.scaling)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, 1, self.n_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(m.norm(h[:, -1]))                                     # B,V

    def _run_step(self, b, w):
        """The static step, replayed from its CUDA graph (captured on first use) or run as is."""
        if not self.graphs or self.model.training:
            return self._step(b, w)
        g = self._graphs.get((b, w))
        if g is None:
            t0 = time.perf_counter()
            dev = self._buf.kv.device
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):       # warm-up: lazy initialisation happens outside the capture;
                for _ in range(2):              # it runs this very step, so writing its keys again is harmless
                    self._step(b, w)
            torch.cuda.current_stream(dev).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()      # one memory pool for all of them
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._step(b, w)
            g = self._graphs[(b, w)] = (graph, logits)
            self.graph_captures += 1
            self.capture_seconds += time.perf_counter() - t0
        g[0].replay()
        return g[1]

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
        prompts_in, reuse_in = prompts, reuse
        prompts, caches, reuse = [prompts_in[b] for b in order], [caches[b] for b in order], [reuse[b] for b in order]
        new = [len(ids) - n for ids, n in zip(prompts, reuse)]
        maxP, maxS = max(reuse), max(new)
        T = maxP + maxS + self.max_new_tokens
        # keys/values of every layer in one tensor: [layers, 2, rows, kv_heads, columns, head_dim]
        if self.static:
            buf = self._static_buffers(B, T, dev, dt)
            kv, valid = buf.kv, buf.valid                  # more rows and columns than this call uses
        else:
            kv = torch.zeros(self.n_layers, 2, B, self.n_kv, T, self.head_dim, device=dev, dtype=dt)
        ids = torch.zeros(B, maxS, dtype=torch.long)       # built on the host, moved once
        pos = torch.zeros(B, maxS, dtype=torch.long)
        valid_h = torch.zeros(B, T, dtype=torch.bool)
        for b, (p, n, s, c) in enumerate(zip(prompts, reuse, new, caches)):
            if n:
                kv[:, :, b, :, maxP - n:maxP] = c.kv[:, :, :, :n].to(dev, dt)   # L,2,kv,n,hd
                valid_h[b, maxP - n:maxP] = True
            ids[b, maxS - s:] = torch.tensor(p[n:])
            pos[b, maxS - s:] = torch.arange(n, n + s)
            valid_h[b, maxP + maxS - s:maxP + maxS] = True
        ids, pos = ids.to(dev), pos.to(dev)
        if self.static:
            valid[:B, :T] = valid_h.to(dev)
        else:
            valid = valid_h.to(dev)
        self.reused_tokens += sum(reuse)
        self.prefilled_tokens += sum(new)
        _sync(dev)
        t0 = time.perf_counter()
        logits = []
        for a, b in prefill_chunks(new, self.prefill_overhead):                 # each chunk: its rows, its longest row's columns
            S = new[b - 1]
            logits.append(self._forward(ids[a:b, maxS - S:], pos[a:b, maxS - S:], kv[:, 0, a:b],
                                        kv[:, 1, a:b], valid[a:b], maxP + maxS - S))
        logits = torch.cat(logits)                                         # B,V
        _sync(dev)
        t1 = time.perf_counter()
        next_pos = torch.tensor([n + s for n, s in zip(reuse, new)], device=dev)
        eos = self.eos.to(dev)
        out = torch.zeros(B, self.max_new_tokens, dtype=torch.long, device=dev)
        lengths = torch.full((B,), self.max_new_tokens, dtype=torch.long, device=dev)
        rows = torch.tensor(order, device=dev)       # which prompt each row of kv/valid/logits is
        rows_h = list(order)                         # the same, on the host
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        new_tokens, new_caches = [None] * B, [None] * B

        def hand_back(locals_, stored):
            """Rows `locals_` are finished: their tokens and caches. A row's keys/values are in
            two runs of columns, its cached tokens [maxP - n, maxP) and its new prompt tokens
            followed by the generated ones that have keys/values, from maxP + maxS - s up to
            `stored`; the cache keeps them up to the length of prompt + generated tokens."""
            lens, toks = lengths.tolist(), out.tolist()
            for local in locals_:
                b = rows_h[local]
                gen = toks[b][:lens[b]]
                n = reuse_in[b]
                s = len(prompts_in[b]) - n
                g = min(len(gen), stored - maxP - maxS)
                x = kv[:, :, local]                                        # L,2,kv,T,hd
                cached, run = x[:, :, :, maxP - n:maxP], x[:, :, :, maxP + maxS - s:maxP + maxS + g]
                new_tokens[b] = gen
                new_caches[b] = KVCache((prompts_in[b] + gen)[:n + s + g], torch.cat((cached, run), 3))

        n_done = 0                                   # rows of the batch that have ended
        b_static = row_bucket(B)                     # rows the static step runs
        for t in range(self.max_new_tokens):
            tok = self._sample(logits, generator)                          # rows
            out[rows, t] = tok
            hit = torch.isin(tok, eos) & ~done
            lengths[rows] = torch.where(hit, t + 1, lengths[rows])
            done |= hit
            self.decoded_tokens += len(rows_h) - n_done   # tokens of rows still generating
            n_done = int(done.sum())                 # the step's one wait for the device
            stored = maxP + maxS + t                 # columns with keys/values so far
            if n_done == len(rows_h) or t + 1 == self.max_new_tokens:
                break
            if n_done * 2 >= len(rows_h):            # most rows finished: hand them back, drop them
                hand_back(done.nonzero().squeeze(-1).tolist(), stored)
                keep = (~done).nonzero().squeeze(-1)
                if self.static:                      # the live rows move to the front of the buffers
                    kv[:, :, :len(keep), :, :T] = kv[:, :, keep, :, :T]
                    valid[:len(keep), :T] = valid[keep, :T]
                    b_static = row_bucket(len(keep))
                else:
                    kv, valid = kv[:, :, keep], valid[keep]
                rows_h = [rows_h[i] for i in keep.tolist()]
                rows, next_pos, tok, done = rows[keep], next_pos[keep], tok[keep], done[keep]
                n_done = 0
            c = maxP + maxS + t
            if self.static:
                n = len(rows_h)
                buf.tok[:n] = tok
                buf.pos[:n] = next_pos
                buf.col.fill_(c)
                logits = self._run_step(b_static, min(_round_up(c + 1, STATIC_BLOCK), kv.shape[4]))[:n]
            else:
                valid[:, c] = True
                logits = self._forward(tok[:, None], next_pos[:, None], kv[:, 0], kv[:, 1], valid, c)
            self.decode_steps += 1
            next_pos += 1
        _sync(dev)
        self.prefill_seconds += t1 - t0
        self.decode_seconds += time.perf_counter() - t1
        hand_back(range(len(rows_h)), stored)
        return new_tokens, new_caches
