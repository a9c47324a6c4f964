"""Assignment A3 (SFT on the response only, assignments/A3-sft.md): the autograder.
`python -m pytest -m a3`.

No model weights: a word-level tokenizer written here (its ids can be read off by hand), and a
"bigram" model whose next-token probabilities are a table written out below (so every
log-probability is the log of a number in that table), with both paths of token_logprobs (an
output embedding, or full logits). The same functions on a tiny random-init Llama (the real
transformers path) are checked in tests/test_assignments.py, outside the autograder: importing
transformers alone takes ~10 s of this 2-core machine's CPU."""
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import lora

pytestmark = pytest.mark.a3


class WordTok:
    """Splits on whitespace and around special tokens <|...|>. Like many real tokenizers it puts
    a beginning-of-sequence token <s> first unless add_special_tokens=False."""

    def __init__(self, end="<|im_end|>"):
        words = ["<pad>", "<unk>", "<|im_start|>", end, "</s>", "<s>", "user", "assistant", "hi", "there",
                 "in", "30", "days", "no"]
        self.vocab = {w: i for i, w in enumerate(words)}
        self.pad_token_id, self.unk_token_id, self.eos_token_id = 0, 1, 4

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.get(t, 1) for t in re.findall(r"<\|[a-z_]+\|>|[^\s<]+", text)]
        return SimpleNamespace(input_ids=([5] if add_special_tokens else []) + ids)

    def convert_tokens_to_ids(self, token):
        return self.vocab.get(token, self.unk_token_id)

    def __len__(self):
        return len(self.vocab)


PROMPT = "<|im_start|>user hi there<|im_end|>\n<|im_start|>assistant\n"


def test_encode_example_by_hand():
    tok = WordTok()
    ex = lora.encode_example(tok, PROMPT, "in 30 days")
    #                      <|im_start|> user hi there <|im_end|> <|im_start|> assistant | in 30 days <|im_end|>
    assert ex["input_ids"] == [2, 6, 8, 9, 3, 2, 7, 10, 11, 12, 3]
    assert ex["labels"] == [-100] * 7 + [10, 11, 12, 3]
    ex = lora.encode_example(tok, "<|im_start|>assistant\n", "no")
    assert ex == {"input_ids": [2, 7, 13, 3], "labels": [-100, -100, 13, 3]}


def test_encode_example_ends_with_the_templates_end_of_turn_token():
    """Not eos (</s>, id 4): the token that closes an assistant turn, here <|eot_id|> (id 3)."""
    tok = WordTok(end="<|eot_id|>")
    ex = lora.encode_example(tok, "<|im_start|>user hi<|eot_id|>\n<|im_start|>assistant\n", "no days")
    assert ex["input_ids"] == [2, 6, 8, 3, 2, 7, 13, 12, 3]
    assert ex["labels"] == [-100] * 6 + [13, 12, 3]


def test_collate_by_hand():
    e1 = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    e2 = {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, 12]}
    b = lora.collate([e1, e2], pad_id=4)
    assert b["input_ids"].tolist() == [[5, 6, 7, 4, 4], [8, 9, 10, 11, 12]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in b.values())
    # max_len keeps the *last* tokens (the response), dropping prompt tokens from the left
    b = lora.collate([e1, e2], pad_id=0, max_len=3)
    assert b["input_ids"].tolist() == [[5, 6, 7], [10, 11, 12]]
    assert b["labels"].tolist() == [[-100, 6, 7], [10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]


# ----------------------------------------------------------------------------------------
# token_logprobs and sft_loss on a model whose probabilities are a table
# ----------------------------------------------------------------------------------------

# P[x][y]: the probability of token y right after token x
P = torch.tensor([[0.25, 0.25, 0.25, 0.25],
                  [0.10, 0.20, 0.30, 0.40],
                  [0.50, 0.125, 0.125, 0.25],
                  [0.70, 0.10, 0.10, 0.10]])


class _OneHot(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(input_ids, self.v).float())


class Bigram(nn.Module):
    """A causal LM whose logits at position t depend only on token t: log(table[token]) (any
    constant shift of a row gives the same softmax). `head=False`: no output embedding, so
    token_logprobs takes its full-logits path."""

    def __init__(self, table, head=True, shift=0.0):
        super().__init__()
        v = table.shape[0]
        self.body = _OneHot(v)
        self.lm_head = nn.Linear(v, v, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_((table.log() + shift).T)
        self.has_head = head
        self.config = SimpleNamespace()

    @property
    def base_model(self):
        return self.body

    def get_output_embeddings(self):
        return self.lm_head if self.has_head else None

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.lm_head(self.body(input_ids).last_hidden_state))


BATCH = {  # row 0: prompt [2, 1], response [3, 2], one pad; row 1: prompt [1], response [2, 2, 3, 1]
    "input_ids": torch.tensor([[2, 1, 3, 2, 0], [1, 2, 2, 3, 1]]),
    "labels": torch.tensor([[-100, -100, 3, 2, -100], [-100, 2, 2, 3, 1]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
}
# position t scores the label at t + 1 given token t:
#   row 0: t=1: P[1][3] = 0.4, t=2: P[3][2] = 0.1          (t=0 predicts a prompt token, t=3 the pad)
#   row 1: t=0: P[1][2] = 0.3, t=1: P[2][2] = 0.125, t=2: P[2][3] = 0.25, t=3: P[3][1] = 0.1
WANT_LP = torch.tensor([[0.0, math.log(0.4), math.log(0.1), 0.0],
                        [math.log(0.3), math.log(0.125), math.log(0.25), math.log(0.1)]])
WANT_MASK = torch.tensor([[False, True, True, False], [True, True, True, True]])


@pytest.mark.parametrize("head,shift", [(True, 0.0), (False, 0.0), (True, 3.0)])
def test_token_logprobs_by_hand(head, shift):
    lp, mask = lora.token_logprobs(Bigram(P, head, shift), BATCH)
    assert lp.shape == mask.shape == (2, 4) and mask.dtype == torch.bool
    assert torch.equal(mask, WANT_MASK)
    torch.testing.assert_close(lp, WANT_LP)


@pytest.mark.parametrize("seed", [0, 1])
def test_token_logprobs_against_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    v, b, s = 7, 3, 9
    table = torch.softmax(torch.randn(v, v, generator=g) * 2, 1)
    ids = torch.randint(0, v, (b, s), generator=g)
    labels = ids.clone()
    starts = [2, 4, 1]                                                # prompt lengths
    ends = [9, 6, 8]                                                  # right padding after these
    for i in range(b):
        labels[i, :starts[i]] = -100
        labels[i, ends[i]:] = -100
    am = (torch.arange(s)[None] < torch.tensor(ends)[:, None]).long()
    lp, mask = lora.token_logprobs(Bigram(table), {"input_ids": ids, "labels": labels, "attention_mask": am})
    for i in range(b):
        for t in range(s - 1):
            real = labels[i, t + 1].item() != -100
            assert mask[i, t].item() == real, (i, t)
            want = math.log(table[ids[i, t], labels[i, t + 1]].item()) if real else 0.0
            assert lp[i, t].item() == pytest.approx(want, abs=1e-5), (i, t)


def test_sft_loss_by_hand():
    total = -(math.log(0.4) + math.log(0.1) + math.log(0.3) + math.log(0.125) + math.log(0.25) + math.log(0.1))
    model = Bigram(P)
    assert lora.sft_loss(model, BATCH).item() == pytest.approx(total / 6, rel=1e-5)     # 6 response tokens
    assert lora.sft_loss(model, BATCH, n_tokens=10).item() == pytest.approx(total / 10, rel=1e-5)
    empty = dict(BATCH, labels=torch.full_like(BATCH["labels"], -100))
    assert lora.sft_loss(model, empty).item() == 0.0                   # no response tokens: 0, not NaN


def test_sft_gradient_reaches_only_rows_that_predict_response_tokens():
    """Row x of the table gets gradient only if token x is followed by a labelled token:
    tokens 1, 2, 3 here; token 0 (only the pad and the last position) gets none."""
    model = Bigram(P)
    lora.sft_loss(model, BATCH).backward()
    g = model.lm_head.weight.grad.T                                   # (from token, to token)
    assert g[0].abs().sum() == 0
    assert all(g[x].abs().sum() > 0 for x in (1, 2, 3))
