"""LoRA by hand: a fresh adapter changes nothing, merge/unmerge are exact, only LoRA
parameters learn, adapters round-trip, and (where peft is installed) PEFT loads our files
and computes the same logits."""
import copy

import pytest
import torch

import lora


@pytest.fixture
def model(tiny_lm):
    return copy.deepcopy(tiny_lm[0])


def _ids(tok, n=2):
    return tok(["I can pay in 45 days.", "Bedtime at 10:30 PM, deal?"][:n], return_tensors="pt", padding=True)


def _randomise(m):
    with torch.no_grad():
        for mod in lora.lora_modules(m).values():
            mod.lora_B.weight.normal_(0, 0.05)


def test_inject_matches_names_and_fresh_adapter_changes_nothing(model, tiny_lm):
    tok = tiny_lm[1]
    enc = _ids(tok)
    with torch.no_grad():
        before = model(**enc).logits
    names = lora.inject(model, r=4, alpha=8, dropout=0.0)
    assert len(names) == 4 * model.config.num_hidden_layers
    assert all(n.rsplit(".", 1)[1] in lora.DEFAULT_TARGETS for n in names)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, before)          # B = 0
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.inject(copy.deepcopy(tiny_lm[0]), targets=["no_such_proj"])


def test_merge_equals_unmerged_and_unmerge_restores(model, tiny_lm):
    enc = _ids(tiny_lm[1])
    lora.inject(model, r=4, alpha=8, dropout=0.0)
    w0 = {n: m.base_layer.weight.clone() for n, m in lora.lora_modules(model).items()}
    _randomise(model)
    model.eval()
    with torch.no_grad():
        unmerged = model(**enc).logits
        lora.merge(model)
        merged = model(**enc).logits
        lora.merge(model)                                       # idempotent
        assert torch.allclose(model(**enc).logits, merged)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge(model)
    for n, m in lora.lora_modules(model).items():
        torch.testing.assert_close(m.base_layer.weight, w0[n], atol=1e-6, rtol=0)
    assert not any(m.merged for m in lora.lora_modules(model).values())


def test_adapter_stays_float32_on_a_bf16_base(model, tiny_lm):
    """The GPU default loads the base in bf16; the adapter must still learn from small steps."""
    enc = _ids(tiny_lm[1])
    model = model.to(torch.bfloat16)
    lora.inject(model, r=4, alpha=8, dropout=0.0)
    params = lora.trainable_parameters(model)
    assert all(p.dtype == torch.float32 for p in params)
    assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in lora.lora_modules(model).values())
    _randomise(model)
    A0 = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    for p in params:
        p.requires_grad_(True)
    out = model(**enc).logits                                  # runs with a bf16 base and fp32 adapter
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().pow(2).mean().backward()
    opt.step()
    # Adam's first step moves every entry with a gradient by ~lr; in bf16 most would round back
    moved = [(p.detach() != a).float().mean().item() for p, a in zip(params, A0)]
    assert min(moved) > 0.9, moved
    lora.merge(model)                                          # folds into the bf16 weight
    assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in lora.lora_modules(model).values())


def test_eval_does_not_merge_and_dropout_only_on_lora_input(model, tiny_lm):
    lora.inject(model, r=4, alpha=8, dropout=0.5)
    model.eval()
    assert not any(m.merged for m in lora.lora_modules(model).values())
    layer = next(iter(lora.lora_modules(model).values()))
    layer.train()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():  # B = 0: dropout on the LoRA path cannot change the output
        assert torch.equal(layer(x), layer.base_layer(x))


def test_only_lora_parameters_get_gradients(model, tiny_lm):
    enc = _ids(tiny_lm[1])
    lora.inject(model, r=4, alpha=8)
    _randomise(model)
    out = model(**enc, labels=enc["input_ids"])
    out.loss.backward()
    trainable = {id(p) for p in lora.trainable_parameters(model)}
    for n, p in model.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_save_load_round_trip(model, tiny_lm, tmp_path):
    enc = _ids(tiny_lm[1])
    lora.inject(model, r=4, alpha=8, dropout=0.0)
    _randomise(model)
    with torch.no_grad():
        want = model(**enc).logits
    lora.save_adapter(model, str(tmp_path / "adapter"), "tiny")
    other = copy.deepcopy(tiny_lm[0])
    cfg = lora.load_adapter(other, str(tmp_path / "adapter"))
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    with torch.no_grad():
        torch.testing.assert_close(other(**enc).logits, want, atol=1e-6, rtol=0)


def test_peft_loads_our_adapter_with_same_logits(model, tiny_lm, tmp_path):
    peft = pytest.importorskip("peft")
    enc = _ids(tiny_lm[1])
    lora.inject(model, r=4, alpha=8, dropout=0.0)
    _randomise(model)
    with torch.no_grad():
        want = model(**enc).logits
    lora.save_adapter(model, str(tmp_path / "adapter"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_lm[0]), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**enc).logits, want, atol=1e-5, rtol=1e-5)


def test_cached_decoder_runs_through_lora_layers(model, tiny_lm):
    import decode
    tok = tiny_lm[1]
    lora.inject(model, r=4, alpha=8, dropout=0.0)
    _randomise(model)
    model.eval()
    prompt = tok("Hold on for 90 minutes.").input_ids
    dec = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=8, temperature=0)
    ours, _ = dec.generate([prompt])
    ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                         pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    if tok.eos_token_id in ref:
        ref = ref[:ref.index(tok.eos_token_id) + 1]
    assert ours[0] == ref


def test_inject_and_load_adapter_follow_the_model_mode(tmp_path):
    """LoRA layers injected into (or loaded onto) a model in eval mode are in eval mode too: no
    dropout, so an unmerged forward pass is deterministic."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    x = torch.randn(4, 8)
    for make in ("inject", "load"):
        m = model()
        if make == "inject":
            lora.inject(m, targets=["0"], r=2, alpha=4, dropout=0.5)
            torch.nn.init.normal_(m[0].lora_B.weight)
        else:
            src = model()
            lora.inject(src, targets=["0"], r=2, alpha=4, dropout=0.5)
            torch.nn.init.normal_(src[0].lora_B.weight)
            lora.save_adapter(src, str(tmp_path / "a"))
            lora.load_adapter(m, str(tmp_path / "a"))
        assert not m[0].training and not m[0].lora_dropout.training, make
        assert torch.equal(m(x), m(x)), make
    m = model().train()
    lora.inject(m, targets=["0"], r=2, alpha=4, dropout=0.5)
    assert m[0].lora_dropout.training                     # a model in training mode keeps dropout on
