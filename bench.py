"""Throughput on this machine, printed as numbers: `python emodistill.py bench`. Not needed to
follow the paper; the speed measurements in docs/notebook.md come from here.
"""
from __future__ import annotations

import dataclasses
import json
import time

import negotiate as ng
from domains import load_config, make_scenarios
from models import load_lm


def bench(domains_file="domains.yaml", what="collect,iql,generate,sft", sim_seeds=50, model="smollm2", batch=64,
          new_tokens=48, train_batch=8, train_len=560, reps=3, batches="", decoders="eager,static"):
    """Throughput on this machine: sim collection (trajectories/s), IQL gradient steps/s,
    SmolLM2 generation (`batches`, default 1 and `batch`: model.generate against the cached
    decoder in each of `decoders`; see _bench_generate), and the cost of an SFT and a JPO
    training step."""
    cfg = load_config(domains_file)
    perceiver = ng.Perceiver(cfg.emotions)
    if "collect" in what:
        eps = [ng.new_episode(cfg.domains[d], sc, k) for d in cfg.domains
               for sc in make_scenarios(cfg.domains[d])[:80] for k in range(sim_seeds)]
        t0 = time.time()
        for s in range(0, len(eps), 512):
            ng.run_episodes(cfg, eps[s:s + 512], ng.SimTeacher(cfg), ng.SimCounterparty(cfg, perceiver),
                            ng.random_emotion_policy(), perceiver)
        lines = [json.dumps(ng.to_record(ep)) for ep in eps]
        dt = time.time() - t0
        print(f"collect[sim]: {len(eps)} trajectories (80 scenarios x {sim_seeds} seeds x "
              f"{len(cfg.domains)} domains) in {dt:.1f}s = {len(eps) / dt:.0f} trajectories/s "
              f"({sum(map(len, lines)) / 1e6:.1f} MB of JSON)")
    if "iql" in what:
        import iql
        import torch
        eps = [ng.new_episode(cfg.domains[d], sc, k) for d in cfg.domains
               for sc in make_scenarios(cfg.domains[d])[:80] for k in range(5)]
        ng.run_episodes(cfg, eps, ng.SimTeacher(cfg), ng.SimCounterparty(cfg, perceiver),
                        ng.random_emotion_policy(), perceiver)
        recs = [ng.to_record(ep) for ep in eps]
        for rec in recs:
            ng.add_judge_scores(rec, cfg)
        hp = iql.IQLConfig(steps=2000, log_every=10 ** 9)
        data = iql.transitions(recs, list(cfg.domains), hp, cfg.max_turns)
        t0 = time.time()
        iql.train(data, hp, log=None)
        dt = time.time() - t0
        print(f"iql: {hp.steps} gradient steps (batch {hp.batch_size}, hidden {hp.hidden}, {data['s'].shape[1]} "
              f"features, torch threads {torch.get_num_threads()}) in {dt:.1f}s = {hp.steps / dt:.0f} steps/s; "
              f"20k steps take ~{20000 / (hp.steps / dt) / 60:.1f} min")
    if "generate" in what:
        _bench_generate(cfg, perceiver, model, batch, new_tokens, batches, decoders)
    if "sft" in what or "jpo" in what:
        _bench_train(model, train_batch, train_len, reps)


def _lm_episodes(cfg, perceiver, n):
    """n negotiations 4 turns in (crad domain): scenarios 0-99 with seed 0, then seed 1, ..."""
    dom = cfg.domains["crad"]
    scs = make_scenarios(dom)
    eps = [ng.new_episode(dom, scs[i % len(scs)], i // len(scs)) for i in range(n)]
    four = dataclasses.replace(cfg, max_turns=4)
    ng.run_episodes(four, eps, ng.SimTeacher(cfg), ng.SimCounterparty(cfg, perceiver),
                    ng.random_emotion_policy(), perceiver)
    for ep in eps:
        ep.end = None
    return eps, ng.random_emotion_policy()(eps)


def _cached_agent(model, tok, cfg, mode, **kw):
    """An LMAgent whose cached decoder is `mode`: eager (the step that reads only the columns
    so far), static (the fixed-shape step; in CUDA graphs on a GPU)."""
    import decode
    agent = ng.LMAgent(model, tok, cfg, kv_cache=True, **kw)
    d = agent.decoder
    agent.decoder = decode.KVDecoder(model, d.eos.tolist(), d.max_new_tokens, d.temperature, d.top_p, d.top_k,
                                     static=mode != "eager")
    return agent


def _mode_name(d):
    return "graphs" if d.graphs else "static" if d.static else "eager"


def _bench_generate(cfg, perceiver, model_spec, batch, new_tokens, batches="", decoders="eager,static"):
    """Generation speed on negotiation prompts 4 turns in (crad domain), at each batch size of
    `batches` (default 1 and `batch`): `model.generate` end to end (prefill + decode), and our
    cached decoder from an empty cache, once per mode of `decoders` (eager, static: see
    decode.py), after one untimed call of the same shape (so the graphs exist): decoding
    ms/step, prefill, end to end and the ratio to `model.generate`. Then, with both modes, the
    share of identical greedy replies; and a 12-turn collection at `batch` where the cache is
    reused between turns, once per mode."""
    import torch

    import decode
    model, tok = load_lm(model_spec)
    sizes = [int(b) for b in str(batches).split(",") if b.strip()] if batches else sorted({1, batch})
    modes = [m.strip() for m in decoders.split(",") if m.strip()]
    if not decode.supports(model):
        modes = []
    print(f"generate[{model_spec}]: device {next(model.parameters()).device}, dtype {model.dtype}, "
          f"torch threads {torch.get_num_threads()}, {new_tokens} new tokens max, batches {sizes}")
    eps, emos = _lm_episodes(cfg, perceiver, max(max(sizes), 2))

    def fresh(eps_):
        for ep in eps_:
            ep.private.pop("kv:focal", None)

    for bs in sizes:
        n = 2 if bs == 1 else bs
        hf = ng.LMAgent(model, tok, cfg, batch_size=bs, max_new_tokens=new_tokens, kv_cache=False)
        texts = hf.prompts(eps[:n], emos[:n])
        hf.generate(texts[:1])  # warm-up
        hf.generated_tokens = hf.prompt_tokens = 0
        hf.gen_seconds = 0.0
        hf.generate(texts)
        ref = hf.generated_tokens / hf.gen_seconds
        print(f"  model.generate  batch {bs:>3}: {ref:8.1f} new tokens/s end to end "
              f"({hf.prompt_tokens // n} prompt tokens each, run every turn)")
        for mode in modes:
            kv = _cached_agent(model, tok, cfg, mode, batch_size=bs, max_new_tokens=new_tokens)
            fresh(eps[:n])
            kv.generate_cached(eps[:n], texts)                         # untimed: the first call captures the graphs
            first, d = kv.gen_seconds, kv.decoder
            captures, capture_s = d.graph_captures, d.capture_seconds
            kv.generated_tokens = kv.prompt_tokens = kv.reused_tokens = 0
            kv.gen_seconds = 0.0
            for k in ("reused_tokens", "prefilled_tokens", "decoded_tokens", "decode_steps", "graph_captures"):
                setattr(d, k, 0)
            d.prefill_seconds = d.decode_seconds = d.capture_seconds = 0.0
            fresh(eps[:n])
            kv.generate_cached(eps[:n], texts)
            e2e = kv.generated_tokens / kv.gen_seconds
            extra = (f"; {captures} graphs captured in the first call ({capture_s:.2f}s of its {first:.2f}s), "
                     f"{d.graph_captures} more in this one" if d.graphs else "")
            ms = 1e3 * d.decode_seconds / max(d.decode_steps, 1)
            print(f"  cached {_mode_name(d):<6}   batch {bs:>3}: {ms:7.2f} "
                  f"ms/step decoding ({d.decoded_tokens / d.decode_seconds:8.1f} new tokens/s), "
                  f"{d.prefilled_tokens / d.prefill_seconds:8.1f} prompt tokens/s prefill, {e2e:8.1f} new tokens/s "
                  f"end to end from an empty cache = {e2e / ref:5.2f}x model.generate{extra}")
    if "eager" in modes and "static" in modes:
        n = max(max(sizes), 2)
        prompts = [tok(t, add_special_tokens=False).input_ids
                   for t in ng.LMAgent(model, tok, cfg, kv_cache=False).prompts(eps[:n], emos[:n])]
        eos = _cached_agent(model, tok, cfg, "eager").decoder.eos.tolist()
        a = decode.KVDecoder(model, eos, new_tokens, temperature=0, static=False).generate(prompts)[0]
        b = decode.KVDecoder(model, eos, new_tokens, temperature=0, static=True).generate(prompts)[0]
        diverge = [next((i for i, (x, y) in enumerate(zip(u, v)) if x != y), min(len(u), len(v)))
                   for u, v in zip(a, b) if u != v]
        print(f"  greedy, batch {n}: static and eager replies identical for {sum(u == v for u, v in zip(a, b))} of {n}"
              + (f" (the others first differ at tokens {sorted(diverge)})" if diverge else ""))
    twelve = dataclasses.replace(cfg, max_turns=12)
    dom = cfg.domains["crad"]
    for mode in modes or [None]:
        eps = [ng.new_episode(dom, sc, 0) for sc in make_scenarios(dom)[:batch]]
        agent = (_cached_agent(model, tok, twelve, mode, batch_size=batch, max_new_tokens=new_tokens) if mode else
                 ng.LMAgent(model, tok, twelve, batch_size=batch, max_new_tokens=new_tokens))
        t0 = time.time()
        ng.run_episodes(twelve, eps, agent, ng.SimCounterparty(cfg, perceiver), ng.random_emotion_policy(), perceiver)
        dt = time.time() - t0
        name = f"cached decoder, {_mode_name(agent.decoder)}" if agent.kv_cache else "model.generate"
        print(f"collect[{model_spec} teacher vs sim, {name}]: {len(eps)} episodes x up to 12 turns in {dt:.1f}s: "
              f"{agent.generated_tokens / dt:.1f} new tokens/s end to end; prompt tokens run "
              f"{agent.prompt_tokens}, reused from cache {agent.reused_tokens}")
        if agent.kv_cache:
            d = agent.decoder
            ms = 1e3 * d.decode_seconds / max(d.decode_steps, 1)
            print(f"  of which decoding {d.decode_seconds:.1f}s ({d.decoded_tokens / d.decode_seconds:.1f} new "
                  f"tokens/s, {ms:.2f} ms/step), prefill {d.prefill_seconds:.1f}s "
                  f"({d.prefilled_tokens / d.prefill_seconds:.1f} prompt tokens/s)"
                  + (f", {d.graph_captures} graphs captured in {d.capture_seconds:.1f}s" if d.graphs else ""))


def _bench_train(model_spec, train_batch, train_len, reps):
    """Training-step cost on the student, batch `--train-batch` x `--train-len` tokens with the
    loss on the last 33 (the size of an SFT example here): the frozen model with no LoRA (the
    gradient still flows through every layer), our LoRA, and PEFT's LoRA when installed, all
    forward+backward with the same response-only head; then one JPO optimiser step."""
    import copy

    import torch

    import jpo
    import lora
    base, _ = load_lm(model_spec)
    dev = next(base.parameters()).device
    B, S, R = train_batch, train_len, 33
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (B, S), generator=g).to(dev)                      # B,S
    labels = torch.full_like(ids, -100)
    labels[:, -R:] = ids[:, -R:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def step(model):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)          # B,S,D
        with lora.autocast_for(model):
            h = model.base_model(inputs_embeds=emb).last_hidden_state                   # B,S,D
            logits = model.get_output_embeddings()(h[:, -R - 1:-1]).float()            # B,R,V
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, -R:].flatten())
        loss.backward()

    def timed(model, reps=reps, fn=step):
        model.train()
        fn(model)                                                                       # warm-up
        t = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            fn(model)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t.append(time.time() - t0)
            model.zero_grad(set_to_none=True)
        return sorted(t)[len(t) // 2]                                                   # median

    print(f"train[{model_spec}]: device {dev}, dtype {base.dtype}, batch {B} x {S} tokens, loss on the last {R}, "
          f"median of {reps} steps")
    frozen = copy.deepcopy(base).requires_grad_(False)
    t_base = timed(frozen)
    del frozen
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    lora.inject(ours, r=16, alpha=32, dropout=0.05)
    t_ours = timed(ours)
    print(f"  no LoRA (frozen) {t_base:.3f}s/step | our LoRA r=16 on q,k,v,o {t_ours:.3f}s/step = "
          f"{t_ours / t_base:.3f}x the no-LoRA step | SFT {B * S / t_ours:.0f} tokens/s")
    nodrop = copy.deepcopy(ours)
    for mod in lora.lora_modules(nodrop).values():
        mod.lora_dropout = torch.nn.Identity()
    t_nodrop = timed(nodrop)
    del nodrop
    print(f"  our LoRA without its input dropout {t_nodrop:.3f}s/step = {t_nodrop / t_base:.3f}x the no-LoRA step "
          f"(the dropout's share of the LoRA overhead: {(t_ours - t_nodrop) / max(t_ours - t_base, 1e-9):.0%})")
    # a right-padded batch (lengths S/2..S, what `collate` makes): the attention mask handed to
    # the model, as before, against token_logprobs, which drops it for right padding
    lens = torch.linspace(S // 2, S, B).long().tolist()
    pad = {"input_ids": ids, "attention_mask": (torch.arange(S)[None] < torch.tensor(lens)[:, None]).long().to(dev),
           "labels": torch.full_like(ids, -100)}
    for i, n in enumerate(lens):
        pad["labels"][i, n - R:n] = ids[i, n - R:n]

    def with_mask(model):
        h = model.base_model(input_ids=ids, attention_mask=pad["attention_mask"]).last_hidden_state      # B,S,D
        keep = pad["labels"][:, 1:] != -100                                                              # B,S-1
        logits = model.get_output_embeddings()(h[:, :-1][keep]).float()                                  # N,V
        torch.nn.functional.cross_entropy(logits, pad["labels"][:, 1:][keep]).backward()

    def without_mask(model):
        lp, keep = lora.token_logprobs(model, pad)
        (-lp.sum() / keep.sum()).backward()
    t_mask, t_free = timed(ours, fn=with_mask), timed(ours, fn=without_mask)
    print(f"  padded batch ({sum(lens)} of {B * S} tokens): attention mask passed {t_mask:.3f}s/step | dropped for "
          f"right padding {t_free:.3f}s/step = {t_free / t_mask:.3f}x")
    try:
        import peft
    except ImportError:
        print("  peft not installed: PEFT comparison skipped")
    else:
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(lora.DEFAULT_TARGETS)))
        t_peft = timed(pm.base_model.model)
        print(f"  PEFT LoRA {t_peft:.3f}s/step: ours / PEFT = {t_ours / t_peft:.3f}")
        del pm
    opt = torch.optim.AdamW(lora.trainable_parameters(ours), lr=1e-4)
    ours.eval()
    with torch.no_grad():
        ref, _ = lora.token_logprobs(ours, batch)
    adv = torch.linspace(-1, 1, B, device=dev)
    jpo.jpo_step(ours, opt, [batch], [ref], [adv], jpo.JPOConfig())                    # warm-up
    t0 = time.time()
    for _ in range(reps):
        jpo.jpo_step(ours, opt, [batch], [ref], [adv], jpo.JPOConfig())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"  JPO optimiser step (batch {B}): {(time.time() - t0) / reps:.3f}s")


def add_command(command):
    """bench's subcommand, through emodistill.build_parser's `command`."""
    command("bench", bench, "throughput numbers for this machine", [],
            ("--domains-file", dict(help="domain and emotion definitions")),
            ("--what", dict(help="any of collect,iql,generate,sft,jpo")), ("--sim-seeds", dict(type=int)),
            ("--model", dict()), ("--batch", dict(type=int, help="the LM batch of the 12-turn collection (generate)")),
            ("--batches", dict(help="generate: comma-separated batch sizes to time (default 1 and --batch)")),
            ("--decoders", dict(help="generate: cached decoder modes to time, of eager,static (static runs in "
                                     "CUDA graphs on a GPU)")),
            ("--new-tokens", dict(type=int)),
            ("--train-batch", dict(type=int, help="sequences per training step (sft, jpo)")),
            ("--train-len", dict(type=int, help="tokens per training sequence (sft, jpo)")),
            ("--reps", dict(type=int, help="timed training steps (median reported)")))
