"""CLIP encoders (ldmcli.models.clip) on a tiny random CLIPModel saved with save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldmcli.errors import LdmError, UsageError
from ldmcli.models.clip import CLIP_MEAN, CLIP_STD, ClipEncoder, load_image


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: every byte as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def save_tiny_clip(folder: Path, *, dim: int = 16, image_size: int = 32, seed: int = 0) -> Path:
    """A random CLIP (2 layers, width 32, projection ``dim``) with a byte-level BPE vocab, saved as the real asset is
    laid out (transformers ``save_pretrained`` of model and tokenizer). The end-of-text token has the highest id, as in
    OpenAI's vocabulary."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("t", "h"), ("th", "e</w>")])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=2, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # the store's asset is laid out as the openai/clip-vit-large-patch14 repository: vocab.json and merges.txt, no
    # tokenizer.json (which transformers 5 writes), so the tests load the tokenizer the way the real asset loads
    fast = json.loads((folder / "tokenizer.json").read_text())
    (folder / "vocab.json").write_text(json.dumps(fast["model"]["vocab"]))
    merges = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in fast["model"]["merges"]]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    (folder / "tokenizer.json").unlink()
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def clip(clip_dir) -> ClipEncoder:
    return ClipEncoder.from_pretrained(clip_dir)


def test_text_embeddings_unit_norm_and_batched(clip):
    z = clip.encode_text(["a painting of the sea", "the cat", "x" * 500])
    assert z.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    one = clip.encode_text(["the cat"])
    torch.testing.assert_close(one[0], z[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z[0], z[1])


def test_text_is_projected_eot_state(clip):
    """The embedding is text_projection(final-LN hidden state at the end-of-text token), normalised (encode_text)."""
    ids, mask = clip.tokenize(["the sea"])
    eot = clip.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    pos = int((ids[0] == eot).nonzero()[0])
    assert ids[0, 0] == clip.tokenizer.convert_tokens_to_ids("<|startoftext|>")
    hidden = clip.model.text_model(input_ids=ids[:, : pos + 1]).last_hidden_state[0, pos]
    z = clip.model.text_projection(hidden)
    torch.testing.assert_close(clip.encode_text(["the sea"])[0], z / z.norm(), atol=1e-5, rtol=1e-5)


def test_preprocess_equals_explicit_kornia_pipeline(clip):
    import kornia

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 70, 50, generator=g) * 2 - 1
    expected = kornia.geometry.resize(x, (32, 32), interpolation="bicubic", align_corners=True, antialias=True)
    expected = kornia.enhance.normalize((expected + 1) / 2, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD))
    torch.testing.assert_close(clip.preprocess(x), expected, rtol=0, atol=0)


def test_image_embeddings_unit_norm_batched_and_per_image(clip):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 40, 40, generator=g) * 2 - 1
    z = clip.encode_image(x)
    assert z.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    seen = []
    z2 = clip.encode_image_list(list(x), batch_size=2, callback=lambda d, t: seen.append((d, t)))
    torch.testing.assert_close(z2, z, atol=1e-5, rtol=1e-5)
    assert seen == [(2, 3), (3, 3)]
    ref = clip.model.visual_projection(clip.model.vision_model(pixel_values=clip.preprocess(x)).pooler_output)
    torch.testing.assert_close(z, ref / ref.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        clip.encode_image(x[:, :1])


def test_load_image_range_and_errors(tmp_path):
    from PIL import Image

    Image.new("RGB", (5, 4), (255, 0, 128)).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.shape == (3, 4, 5)
    assert img[0].max() == 1.0 and img[1].min() == -1.0
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UsageError, match="cannot read image"):
        load_image(tmp_path / "bad.png")


def test_missing_model_folder_is_one_line_error(tmp_path):
    with pytest.raises(LdmError, match="no CLIP model"):
        ClipEncoder.from_pretrained(tmp_path)


def test_missing_tokenizer_files_are_an_error_not_a_silent_empty_vocab(clip_dir, tmp_path):
    import shutil

    broken = tmp_path / "clip"
    shutil.copytree(clip_dir, broken)
    (broken / "vocab.json").unlink()
    with pytest.raises(LdmError, match="tokenizer"):
        ClipEncoder.from_pretrained(broken)
