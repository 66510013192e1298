"""`compress heads score` on a saved tiny random LLaVA with a real processor and PNG image probes (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, save_llama

WORDS = "[UNK] <s> what is in the picture a cat dog red blue green describe image color shape it".split()
IMAGE_SIZE, PATCH = 32, 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # CLIP's class token is dropped ("default" feature selection)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    root = tmp_path_factory.mktemp("llava_cli")
    tok = _tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    v = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    t = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=v, text_config=t, image_token_index=image_id,
                                                      vision_feature_select_strategy="default"))
    path = root / "llava"
    model.save_pretrained(path)
    improc = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                                "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, image_token="<image>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def probes_file(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("llava_probes")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    sizes = [(40, 48), (32, 32), (57, 35)]  # the processor resizes and crops each to 32×32
    prompts = ["<image> what is in the picture", "describe the image <image> a red", "<image> what color is it"]
    items = []
    for i, ((h, w), prompt) in enumerate(zip(sizes, prompts)):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        items.append({"prompt": prompt, "image": f"img/{i}.png"})  # relative to the probes file's folder
    path = root / "probes.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


def _reference_probes(model_dir: Path, probes: Path):
    """Probes built by hand: the tokenizer on the prompt with the image token repeated N_IMAGE_TOKENS times, the
    image processor on the PNG, without = the same prompt with no image token."""
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor

    from compress.heads.capture import Probe

    tok = AutoTokenizer.from_pretrained(model_dir)
    improc = CLIPImageProcessor.from_pretrained(model_dir)
    image_id = tok.convert_tokens_to_ids("<image>")
    out = []
    for line in probes.read_text().splitlines():
        it = json.loads(line)
        ids = torch.tensor(tok(it["prompt"].replace("<image>", "<image>" * N_IMAGE_TOKENS))["input_ids"])
        without = torch.tensor(tok(it["prompt"].replace("<image>", ""))["input_ids"])
        pixels = improc(Image.open(probes.parent / it["image"]).convert("RGB"), return_tensors="pt")["pixel_values"]
        assert int((ids == image_id).sum()) == N_IMAGE_TOKENS and pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
        out.append(Probe(ids, ids == image_id, without, pixels))
    return out


@pytest.mark.parametrize("method", ["vhd", "nhar"])
def test_llava_heads_score_cli_matches_api(llava_dir, probes_file, tmp_path, method):
    from transformers import LlavaForConditionalGeneration

    from compress.heads.score import score_heads
    from compress.heads.scorefile import load_scores

    out = tmp_path / f"{method}.safetensors"
    code, stdout, err = run_cli("heads", "score", llava_dir, "--method", method, "--probes", probes_file,
                                "--out", out, "--quiet")
    assert code == 0, err
    sf = load_scores(out)
    assert sf.scores.shape == (2, 4) and sf.kv_scores.shape == (2, 2) and bool(sf.scores.isfinite().all())
    assert sf.metadata["method"] == method and int(sf.metadata["n_probes"]) == 3
    assert out.with_suffix(".png").stat().st_size > 1000
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32).eval()
    ref, meta = score_heads(model, _reference_probes(llava_dir, probes_file), method, quiet=True)
    assert torch.allclose(sf.scores, ref, atol=1e-5, rtol=1e-4)
    if method == "vhd":
        assert bool((ref > 0).all())
    else:
        assert bool(((ref >= 0) & (ref <= 1 + 1e-6)).all()) and 0 < meta["inert_share"] < 1


def test_llava_cli_errors(llava_dir, probes_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = probes_file.read_text().splitlines()
    bad.write_text(lines[0] + "\n" + json.dumps({"prompt": "<image> what", "image": "img/missing.png"}) + "\n")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0.png").write_bytes((probes_file.parent / "img" / "0.png").read_bytes())
    code, _, err = run_cli("heads", "score", llava_dir, "--method", "vhd", "--probes", bad,
                           "--out", tmp_path / "x.safetensors")
    lines_err = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines_err) == 1, err
    assert "missing.png" in err and f"{bad}:2" in err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.png").exists()
    # an unreadable image, a prompt without the image token
    (tmp_path / "img" / "junk.png").write_bytes(b"not a png")
    for line, words in [({"prompt": "<image> what", "image": "img/junk.png"}, ["junk.png", "cannot read"]),
                        ({"prompt": "what is it", "image": "img/0.png"}, ["processor", "<image>"])]:
        bad.write_text(json.dumps(line) + "\n")
        code, _, err = run_cli("heads", "score", llava_dir, "--method", "nhar", "--probes", bad,
                               "--out", tmp_path / "x.safetensors")
        assert code == 2 and f"{bad}:1" in err and all(w in err for w in words), err
    # a probe with no image for an image model
    noimg = tmp_path / "noimg.jsonl"
    noimg.write_text(json.dumps({"prompt": "what is in the picture"}) + "\n")
    code, _, err = run_cli("heads", "score", llava_dir, "--method", "vhd", "--probes", noimg,
                           "--out", tmp_path / "y.safetensors")
    assert code == 2 and "image" in err and f"{noimg}:1" in err, err
    # a processor that expands the image token to another count than the model's image features
    import shutil

    other = shutil.copytree(llava_dir, tmp_path / "llava_other")
    pc = json.loads((other / "processor_config.json").read_text())
    (other / "processor_config.json").write_text(json.dumps({**pc, "num_additional_image_tokens": 0}))
    code, _, err = run_cli("heads", "score", other, "--method", "vhd", "--probes", probes_file,
                           "--out", tmp_path / "w.safetensors")
    assert code == 2 and "num_additional_image_tokens" in err and len(err.strip().splitlines()) == 1, err
    # vhd on a text-only Llama: use LLaVA (image probes) or chd
    text = save_llama(tmp_path / "text", seed=0, vocab_size=64)
    _tokenizer().save_pretrained(text)
    code, _, err = run_cli("heads", "score", text, "--method", "vhd", "--probes", probes_file,
                           "--out", tmp_path / "z.safetensors")
    assert code == 2 and "LLaVA" in err and "chd" in err and len(err.strip().splitlines()) == 1, err


def test_llava_text_probes_and_seekr_with_images(llava_dir, probes_file, tmp_path):
    """On LLaVA, probes without an image are text probes (chd through the processor's tokenizer); seekr's loss is
    on the answer after the processed image prompt."""
    from transformers import LlavaForConditionalGeneration

    from compress.heads.probes import encode_probes, read_probes
    from compress.heads.score import score_heads
    from compress.heads.scorefile import load_scores

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"prompt": "a red cat what color is it", "context": "a red cat"}) + "\n")
    code, _, err = run_cli("heads", "score", llava_dir, "--method", "chd", "--probes", text,
                           "--out", tmp_path / "c.safetensors", "--quiet")
    assert code == 0, err
    assert bool((load_scores(tmp_path / "c.safetensors").scores > 0).all())

    seekr = tmp_path / "img" / "seekr.jsonl"
    seekr.parent.mkdir()
    items = [json.loads(x) for x in probes_file.read_text().splitlines()]
    seekr.write_text("".join(json.dumps({**it, "image": str(probes_file.parent / it["image"]), "answer": "a cat"})
                             + "\n" for it in items))
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(llava_dir)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    p = encode_probes(proc, read_probes(seekr), "seekr", seekr, image_id)[0]
    n = p.input_ids.numel()
    assert p.labels[:n - 2].eq(-100).all() and p.labels[n - 2:].tolist() == proc.tokenizer("a cat")["input_ids"]
    assert int((p.input_ids == image_id).sum()) == N_IMAGE_TOKENS and p.pixel_values.shape[-1] == IMAGE_SIZE
    base = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    with torch.no_grad():
        for prm in base.model.language_model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    base.save_pretrained(tmp_path / "base")
    code, _, err = run_cli("heads", "score", llava_dir, "--method", "seekr", "--probes", seekr, "--base",
                           tmp_path / "base", "--out", tmp_path / "s.safetensors", "--quiet")
    assert code == 0, err
    s = load_scores(tmp_path / "s.safetensors").scores
    assert s.shape == (2, 4) and bool(((s > 0) & (s <= 1)).all())
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    ref, _ = score_heads(model, encode_probes(proc, read_probes(seekr), "seekr", seekr, image_id), "seekr",
                         base_model=base.eval(), quiet=True)
    assert torch.allclose(s, ref, atol=1e-5, rtol=1e-4)
