"""Causal-LM evaluators on constructed cases with known answers: perplexity of a uniform model, KL divergence
(zero to itself, a hand-computed value for two bigram models), context-recall scoring with an oracle model whose
every answer is planned."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama_config

from compress.errors import CompressError
from compress.eval import kl_divergence, perplexity, recall_eval
from compress.eval.recall import classify, greedy_continuations, parse_answer, read_recall_items


class WordTokenizer:
    """Whitespace words ↔ ids; <pad>=0, </s>=1, <s>=2 added in front; decode joins words with spaces."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __init__(self, words):
        self.vocab = {"<pad>": 0, "</s>": 1, "<s>": 2}
        for w in words:
            self.vocab.setdefault(w, len(self.vocab))
        self.inv = {i: w for w, i in self.vocab.items()}

    def __call__(self, text, verbose=False, add_special_tokens=True):
        ids = [self.vocab[w] for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.inv[i] for i in ids if not (skip_special_tokens and i < 3))


class IdTokenizer:
    """The text is the token ids, written out: '2 0 1' → [2, 0, 1]."""

    def __call__(self, text, verbose=False):
        return {"input_ids": [int(t) for t in text.split()]}


class BigramLM(torch.nn.Module):
    """logits at position t = table[token at t]: next-token distributions are known in closed form."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids, **kw):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def tiny_pair():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    a = LlamaForCausalLM(tiny_llama_config()).eval()
    b = LlamaForCausalLM(tiny_llama_config()).eval()
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            q.copy_(p + 0.05 * torch.randn_like(p))
    return a, b


TEXT = " ".join(str(i % 96) for i in range(7, 7 + 300 * 13, 13))  # 300 ids of the tiny Llama's 96


def test_uniform_model_perplexity_is_vocab_size(tiny_pair):
    model = tiny_pair[0]
    import copy

    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # every logit 0: p = 1/96 for every token
    assert perplexity(uniform, IdTokenizer(), TEXT, seqlen=64, batch_size=3) == pytest.approx(96, rel=1e-5)
    assert perplexity(model, IdTokenizer(), TEXT, seqlen=64) != pytest.approx(96, rel=1e-3)


def test_kl_zero_to_itself_positive_to_other(tiny_pair):
    a, b = tiny_pair
    tok = IdTokenizer()
    assert kl_divergence(a, a, tok, TEXT, seqlen=64, batch_size=2) == pytest.approx(0, abs=1e-7)
    kab = kl_divergence(a, b, tok, TEXT, seqlen=64, batch_size=2)
    kba = kl_divergence(b, a, tok, TEXT, seqlen=64, batch_size=5)
    assert kab > 1e-4 and kba > 1e-4 and kab != pytest.approx(kba, rel=1e-3)  # KL is not symmetric
    assert kl_divergence(a, b, tok, TEXT, seqlen=64, batch_size=1) == pytest.approx(kab, rel=1e-5)
    assert not a.training and not b.training


def test_kl_hand_computed_on_bigram_models():
    model = BigramLM([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [3.0, 0.0, -1.0]])
    ref = BigramLM([[0.5, 0.5, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    text = "2 0 1 2 1 0 0 2 1"  # 9 tokens, seqlen 4: windows [2 0 1 2] [1 0 0 2], tail [1] dropped

    def softmax(row):
        z = sum(math.exp(x) for x in row)
        return [math.exp(x) / z for x in row]

    def kl(p, q):  # KL(p ‖ q)
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    scored = [2, 0, 1] + [1, 0, 0]  # first seqlen-1 positions of each window
    expected = sum(kl(softmax(ref.table[t].tolist()), softmax(model.table[t].tolist())) for t in scored) / 6
    got = kl_divergence(model, ref, IdTokenizer(), text, seqlen=4, batch_size=1)
    assert got == pytest.approx(expected, rel=1e-6)
    assert kl_divergence(model, ref, IdTokenizer(), text, seqlen=4, batch_size=8) == pytest.approx(expected, rel=1e-6)
    # max_tokens=4 keeps the first window only
    first = sum(kl(softmax(ref.table[t].tolist()), softmax(model.table[t].tolist())) for t in [2, 0, 1]) / 3
    assert kl_divergence(model, ref, IdTokenizer(), text, seqlen=4, max_tokens=4) == pytest.approx(first, rel=1e-6)
    with pytest.raises(CompressError, match="different vocabulary sizes"):
        kl_divergence(model, BigramLM([[0.0] * 4] * 3), IdTokenizer(), text, seqlen=4)
    with pytest.raises(CompressError, match="seqlen must be >= 2"):
        kl_divergence(model, ref, IdTokenizer(), text, seqlen=1)


class OracleLM(torch.nn.Module):
    """Greedy decoding of this model follows a plan: prompt tokens → the planned answer tokens, then </s>.

    It also checks what a left-padded batch must give it: position ids counting from each row's first real token.
    """

    def __init__(self, plans: dict[tuple, list[int]], vocab_size: int):
        super().__init__()
        self.next = {}
        for prompt, answer in plans.items():
            seq = list(prompt)
            for t in answer + [1]:
                self.next[tuple(seq)] = t
                seq.append(t)
        self.vocab_size = vocab_size
        self.calls = 0

    def forward(self, input_ids, attention_mask, position_ids, **kw):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for i in range(input_ids.shape[0]):
            real = input_ids[i][attention_mask[i].bool()].tolist()
            n_pad = int((attention_mask[i] == 0).sum())
            assert attention_mask[i, :n_pad].sum() == 0, "padding must be on the left"
            assert position_ids[i, n_pad:].tolist() == list(range(len(real)))
            logits[i, -1, self.next.get(tuple(real), 1)] = 1.0
        return SimpleNamespace(logits=logits)


def _recall_case(tmp_path):
    facts = {"Kelu": "4721", "Bafo": "3310", "Mire": "5084"}

    def prompt(pairs, key):
        facts = " ".join(f"The code of {k} is {v} ." for k, v in pairs)
        return facts + f" Question: what is the code of {key} ? Answer:"

    items = [  # (item, planned answer words, expected outcome)
        ({"kind": "novel", "prompt": prompt(facts.items(), "Bafo"), "answer": "3310"}, ["3310"], "correct"),
        ({"kind": "novel", "prompt": prompt(facts.items(), "Kelu"), "answer": "4721"}, ["5084"], "confusion"),
        ({"kind": "novel", "prompt": prompt(list(facts.items())[:2], "Kelu"), "answer": "4721"}, ["9999"],
         "hallucination"),
        ({"kind": "counterfactual", "prompt": prompt([("Zorb", "1111"), ("Mire", "5084")], "Zorb"), "answer": "1111",
          "prior": "8812"}, ["1111"], "correct"),
        ({"kind": "counterfactual", "prompt": prompt([("Zorb", "2222"), ("Bafo", "3310")], "Zorb"), "answer": "2222",
          "prior": "8812"}, ["8812"], "hallucination"),
        ({"kind": "counterfactual", "prompt": prompt([("Zorb", "3333")], "Zorb"), "answer": "3333",
          "prior": "8812"}, [], "hallucination"),  # says nothing
    ]
    for it, _, _ in items:
        it["context_values"] = [w for w in it["prompt"].split() if w.isdigit()]
    words = sorted({w for it, ans, _ in items for w in it["prompt"].split() + ans + ["9999", "8812"]})
    tok = WordTokenizer(words)
    plans = {tuple(tok(it["prompt"])["input_ids"]): [tok.vocab[w] for w in ans] for it, ans, _ in items}
    path = tmp_path / "recall.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it, _, _ in items))
    return OracleLM(plans, len(tok.vocab)), tok, path, [o for _, _, o in items]


def test_recall_eval_known_rates(tmp_path):
    model, tok, path, outcomes = _recall_case(tmp_path)
    r = recall_eval(model, tok, path, batch_size=4, return_predictions=True)
    assert [p["outcome"] for p in r["predictions"]] == outcomes
    assert r["n"] == 6
    assert r["accuracy"] == pytest.approx(2 / 6)
    assert r["hallucination_rate"] == pytest.approx(3 / 6)
    assert r["confusion_rate"] == pytest.approx(1 / 6)
    assert r["prior_rate"] == pytest.approx(1 / 3)  # one of the three counterfactual items answered the prior
    assert r["chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2 + 1 / 2 + 1 / 2 + 1) / 6)
    assert r["by_kind"]["novel"]["accuracy"] == pytest.approx(1 / 3)
    assert r["by_kind"]["counterfactual"]["hallucination_rate"] == pytest.approx(2 / 3)
    assert r["by_kind"]["novel"]["prior_rate"] is None
    # any batch size gives the same answers (left padding, position ids), and limit takes the first items
    one = recall_eval(model, tok, path, batch_size=1)
    assert {k: one[k] for k in ("accuracy", "hallucination_rate", "confusion_rate")} == \
        {k: r[k] for k in ("accuracy", "hallucination_rate", "confusion_rate")}
    assert recall_eval(model, tok, path, limit=2)["accuracy"] == pytest.approx(0.5)


def test_greedy_batched_matches_one_by_one_on_llama(tiny_pair):
    model = tiny_pair[0]
    tok = WordTokenizer([str(i) for i in range(3, 96)])
    prompts = ["5 9 14", "3 4 5 6 7 8 9 10 11", "50", "60 61 62 63"]
    batched = greedy_continuations(model, tok, prompts, max_new_tokens=5, batch_size=4)
    single = [greedy_continuations(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single
    ids = tok(prompts[1])["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=5, do_sample=False, eos_token_id=1, pad_token_id=0)
    assert single[1] == tok.decode(ref[0, len(ids):].tolist())


def test_parse_and_read_errors(tmp_path):
    assert parse_answer(" 4721. The code") == "4721"
    assert parse_answer("\n\n 12,\nx") == "12"
    assert parse_answer("   ") == ""
    item = {"answer": "12", "context_values": ["12", "34"]}
    assert [classify(p, item) for p in ("12", "34", "56", "")] == ["correct", "confusion", "hallucination",
                                                                    "hallucination"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1", "context_values": []}\nnot json\n')
    with pytest.raises(CompressError, match=r"bad.jsonl:2: not JSON"):
        read_recall_items(bad)
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(CompressError, match=r"bad.jsonl:1: a recall item needs"):
        read_recall_items(bad)
    with pytest.raises(CompressError, match="no such file"):
        read_recall_items(tmp_path / "absent.jsonl")
    assert len(read_recall_items(_recall_case(tmp_path)[2], limit=3)) == 3
