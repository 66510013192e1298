"""lm-zoo: the quick build (real corpora, ~0.3M-parameter Llama, a minute on 2 CPU cores) gives loadable models
whose fine-tunes do what they were trained for, and the recipe fails with one line when it is wrong."""

import json
import random

import pytest
import torch

from compress.errors import CompressError
from compress.eval import load_causal_lm, perplexity, recall_eval
from compress.io.reader import open_checkpoint
from compress.taskvec import TaskVector
from compress.zoo.lm import RECIPE_PATH, build_lm_zoo, load_recipe
from compress.zoo.recall_task import RecallSpec, RecallTask

MODELS = ("base", "shakespeare", "ptb", "recall")
EVAL_SIZE = 60  # recall prompts (the shipped quick recipe has 100): each model's recall pass is the build's eval


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The shipped recipe with a shorter quick pretraining (120 steps, not 200) and evaluation (1024 tokens a text,
    not 2048; 60 recall prompts, not 100): the recall fine-tune, whose copying appears near step 150, keeps its 300
    steps."""
    import yaml

    raw = yaml.safe_load(RECIPE_PATH.read_text())
    raw["quick"]["pretrain"]["steps"] = 120
    raw["quick"]["eval"].update(max_tokens=1024, kl_max_tokens=1024)
    raw["quick"]["recall"]["eval_size"] = EVAL_SIZE
    path = tmp_path_factory.mktemp("recipe") / "lm-zoo.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, recipe):
    out = tmp_path_factory.mktemp("zoo") / "lm-zoo"
    # one thread: a 0.3M-parameter model gains nothing from two, and on a shared 2-core machine two threads that
    # wait for each other make the build several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build = build_lm_zoo(out, device="cpu", quick=True, recipe_path=recipe)
    finally:
        torch.set_num_threads(threads)
    return out, build


def test_quick_build_outputs_load(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, build = zoo
    assert json.loads((out / "build.json").read_text()) == build
    assert (out / "README.md").is_file() and (out / "recall_facts.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert build["quick"] and build["device"] == "cpu" and 2e5 < build["params"] < 1e6
    base_names = None
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(out / name)
        tok = AutoTokenizer.from_pretrained(out / name)
        # the class the project's own loader picks, from config.architectures (a bare LlamaModel has no LM head)
        assert json.loads((out / name / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 2
        assert len(tok) == model.config.vocab_size == build["vocab_size"] == 1024
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        ids = tok("The code of Kelu is 47.")["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "The code of Kelu is 47."
        assert tok.convert_ids_to_tokens(tok(" 4721", add_special_tokens=False)["input_ids"])[-4:] == list("4721")
        names = set(dict(model.named_parameters()))
        base_names = base_names or names
        assert names == base_names  # same tensors: θ_ft − θ_base is a task vector
    base = open_checkpoint(out / "base")
    tv = TaskVector.from_paths(base, out / "shakespeare")
    assert len(tv.names()) == len(base_names) and tv.get("model.layers.0.mlp.up_proj.weight").abs().max() > 0


def test_domain_finetunes_lower_their_domain_perplexity(zoo):
    out, build = zoo
    ppl = {m: build["models"][m]["perplexity"] for m in MODELS}
    print("\nquick lm-zoo perplexity:", json.dumps(ppl))
    assert ppl["shakespeare"]["shakespeare"] < 0.95 * ppl["base"]["shakespeare"]
    assert ppl["ptb"]["ptb"] < 0.95 * ppl["base"]["ptb"]
    assert ppl["base"]["wikitext2"] < 200  # it learned something (uniform would be 1024)
    # the saved folders give the same ranking on held-out text the build never trained on
    from compress.data import corpus_path, read_text

    held = read_text(corpus_path("shakespeare"))[-20000:]
    base_m, tok = load_causal_lm(out / "base")
    ft_m, _ = load_causal_lm(out / "shakespeare")
    assert perplexity(ft_m, tok, held, seqlen=128, max_tokens=1024) < perplexity(base_m, tok, held, seqlen=128,
                                                                                   max_tokens=1024)
    assert build["models"]["shakespeare"]["kl_to_base_wikitext2"] > 0


def test_recall_finetune_beats_chance(zoo):
    out, build = zoo
    rec = {m: build["models"][m]["recall"] for m in MODELS}
    print("\nquick lm-zoo recall:", json.dumps({m: {k: r[k] for k in ("accuracy", "hallucination_rate",
                                                                        "prior_rate")} for m, r in rec.items()}))
    guess = build["data"]["recall_guess_chance"]
    r = rec["recall"]
    assert r["n"] == EVAL_SIZE
    assert r["accuracy"] > max(0.3, 10 * guess) and r["accuracy"] > rec["base"]["accuracy"] + 0.25
    assert r["by_kind"]["novel"]["accuracy"] > 0.5
    assert r["accuracy"] + r["hallucination_rate"] + r["confusion_rate"] == pytest.approx(1)
    # the saved model reproduces the build's number
    model, tok = load_causal_lm(out / "recall")
    again = recall_eval(model, tok, out / "recall_eval.jsonl", batch_size=32)
    assert again["accuracy"] == pytest.approx(r["accuracy"], abs=0.02)


def test_recall_eval_set_is_held_out_and_counterfactual(zoo, recipe):
    out, build = zoo
    items = [json.loads(line) for line in (out / "recall_eval.jsonl").read_text().splitlines()]
    facts = json.loads((out / "recall_facts.json").read_text())["memorized"]
    cf = [it for it in items if it["kind"] == "counterfactual"]
    assert cf and len(cf) + sum(it["kind"] == "novel" for it in items) == len(items)
    for it in cf:
        key = it["prompt"].rsplit("code of ", 1)[1].split("?")[0]
        assert it["prior"] == facts[key] != it["answer"] and it["prior"] not in it["context_values"]
    # the build's training prompts skip these: with one 2-digit fact per prompt, 1 in ~50 would otherwise repeat
    rec = load_recipe(recipe, quick=True)
    task = RecallTask(rec.recall.spec(rec.seed))
    held = frozenset(it["prompt"] for it in items)
    drawn = [it["prompt"] for s in range(20) for it in task.items(16, seed=s, mix=rec.recall.train_mix)]
    kept = [it["prompt"] for s in range(20) for it in task.items(16, seed=s, mix=rec.recall.train_mix,
                                                                 exclude=held)]
    assert set(drawn) & held and not set(kept) & held


def test_recall_task_is_deterministic():
    spec = RecallSpec(facts_min=3, facts_max=5, value_digits=4, memorized_keys=4, name_pool=100, seed=7)
    a, b = RecallTask(spec), RecallTask(spec)
    mix = {"novel": 1, "counterfactual": 1, "consistent": 1, "closed_book": 1}
    assert a.memorized == b.memorized and a.items(20, 3, mix) == b.items(20, 3, mix)
    assert a.items(20, 3, mix) != a.items(20, 4, mix)
    for it in a.items(200, 5, mix):
        assert len(set(it["context_values"])) == len(it["context_values"])
        assert it["kind"] == "closed_book" or it["answer"] in it["context_values"]
        assert all(len(v) == 4 for v in it["context_values"])
    doc = a.restatement_document(random.Random(0))
    first, again = doc.split(" Again: ")
    assert sorted(first.rstrip(".").split(". ")) == sorted(again.rstrip(".").split(". "))


def test_recipe_errors_are_one_line(tmp_path):
    text = RECIPE_PATH.read_text()
    cases = {
        "eval_seed: 2 ": ("eval_seed: 1 ", "eval_seed must differ"),
        "pretrain_corpora: [wikitext2.valid]": ("pretrain_corpora: [wikitext2.test]", "held out for evaluation"),
        "  tokenizer: {vocab_size: 1024}": ("  tokenizer: {vocab_size: 10}", "quick: tokenizer.vocab_size"),
        "  steps: 1200": ("  steps: 0", "pretrain.steps"),
    }
    for old, (new, message) in cases.items():
        assert old in text, old
        bad = tmp_path / "bad.yml"
        bad.write_text(text.replace(old, new, 1))
        with pytest.raises(CompressError, match=message) as e:
            load_recipe(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(CompressError, match="recipe not found"):
        load_recipe(tmp_path / "absent.yml")
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(CompressError, match="already exists; pass --overwrite"):
        build_lm_zoo(taken, quick=True)


def test_eval_cli_kl_and_recall(zoo, tmp_path):
    import json as _json

    from conftest import run_cli

    root, _ = zoo
    text = tmp_path / "calib.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    code, out, err = run_cli("eval", root / "recall", "--kl-to", root / "recall", "--calib", text, "--seqlen", "64",
                             "--json")
    assert code == 0, err
    assert _json.loads(out)["kl_nats_per_token"] == pytest.approx(0.0, abs=1e-6)
    code, out, err = run_cli("eval", root / "recall", "--kl-to", root / "base", "--calib", text, "--seqlen", "64",
                             "--json")
    assert code == 0 and _json.loads(out)["kl_nats_per_token"] > 0.01
    code, out, err = run_cli("eval", root / "recall", "--recall", root / "recall_eval.jsonl", "--json")
    assert code == 0, err
    r = _json.loads(out)
    assert r["accuracy"] + r["hallucination_rate"] + r["confusion_rate"] == pytest.approx(1.0)
    assert r["accuracy"] > 0.5 and r["n"] > 0
    code, _, err = run_cli("eval", root / "recall", "--kl-to", root / "base")
    assert code == 2 and "--kl-to needs --calib" in err


def test_bench_merge_table_over_two_calls_with_rows(zoo, tmp_path):
    """`compress bench merge lm-zoo --rows`: two calls make one table; each held-out half is tokenized once, and
    its perplexity is still `perplexity()`'s."""
    from compress.bench.merge import run
    from compress.bench.merge_lm import _halves, heldout_texts

    zoo, _ = zoo
    common = dict(zoo_root=zoo.parent, results=tmp_path, dev_limit=4, test_limit=4, lambdas=(1.0,), quiet=True,
                  max_tokens=512)
    first = run("lm-zoo", rows="task arithmetic", **common)
    second = run("lm-zoo", rows="simple average", **common)
    assert list(first["rows"])[-1] == "task arithmetic" and "simple average" not in first["rows"]
    saved = json.loads((tmp_path / "merge_lm-zoo.json").read_text())
    merges = [r for r in saved["rows"] if r in ("simple average", "task arithmetic")]
    assert merges == ["simple average", "task arithmetic"]  # table order, the first call's row kept
    assert saved["rows"]["task arithmetic"] == json.loads(json.dumps(first["rows"]["task arithmetic"]))
    assert second["rows"]["task arithmetic"]["lambda"] == 1.0
    assert "| task arithmetic |" in (tmp_path / "merge_lm-zoo.md").read_text()
    model, tok = load_causal_lm(zoo / "base")
    texts = heldout_texts(zoo)
    zero_shot = saved["rows"]["zero-shot"]["scores"]
    for k, text in texts.items():
        assert zero_shot[f"ppl_{k}"] == perplexity(model, tok, _halves(text)[1], seqlen=256, max_tokens=512)
