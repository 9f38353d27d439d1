"""jaxdiff's CLIP tokenizer gives the ids and masks transformers' CLIPTokenizer gave (fixture).

tests/fixtures/make_tokenizer_fixtures.py built the small CLIP-format vocabulary and recorded
transformers' output for the corpus in it (versions in expected.json), for four folder layouts:
SD 1.x (pad <|endoftext|>), SD 2.x (pad "!"), the added_tokens_decoder layout, and tokenizer.json only.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from jaxdiff.pretrained.tokenizer import CLIPTokenizer, TokenizerConfigError, load_tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sd_tokenizer"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
LAYOUTS = ("sd1", "sd2", "sd1_decoder", "sd2_saved")


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request):
    return request.param, load_tokenizer(FIXTURES / request.param)


def test_ids_and_masks_equal_transformers(layout):
    name, tok = layout
    ids, mask = tok(EXPECTED["corpus"])
    want_ids = np.asarray(EXPECTED[name]["input_ids"])
    want_mask = np.asarray(EXPECTED[name]["attention_mask"])
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (len(EXPECTED["corpus"]), 77)
    for i, prompt in enumerate(EXPECTED["corpus"]):
        np.testing.assert_array_equal(ids[i], want_ids[i], err_msg=repr(prompt))
        np.testing.assert_array_equal(mask[i], want_mask[i], err_msg=repr(prompt))


def test_pad_token_and_lengths_follow_the_config(layout):
    name, tok = layout
    assert tok.pad_token_id == EXPECTED[name]["pad_token_id"]
    assert tok.max_length == EXPECTED[name]["model_max_length"] == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (998, 999, 1000)


def test_special_token_ends_truncation_and_padding(layout):
    """Closed form: start, tokens, end, padding; a long prompt keeps its end token at 76."""
    name, tok = layout
    lengths = EXPECTED[name]["untruncated_lengths"]
    ids, mask = tok(EXPECTED["corpus"])
    for i, n in enumerate(lengths):
        n = min(n, 77)
        assert ids[i, 0] == tok.bos_token_id and ids[i, n - 1] == tok.eos_token_id
        assert mask[i].tolist() == [1] * n + [0] * (77 - n)
        assert (ids[i, n:] == tok.pad_token_id).all()
    assert max(lengths) > 77


def test_the_layouts_differ_where_transformers_differs():
    """The fixture is not degenerate: pad ids and the normalized flags change the ids."""
    corpus = EXPECTED["corpus"]
    sd1 = np.asarray(EXPECTED["sd1"]["input_ids"])
    dec = np.asarray(EXPECTED["sd1_decoder"]["input_ids"])
    i = corpus.index("<|ENDOFTEXT|> upper-case special")
    assert (sd1[i] != dec[i]).any() and (np.delete(sd1, i, 0) == np.delete(dec, i, 0)).all()
    j = corpus.index("wow! great!! end!")
    sd2 = np.asarray(EXPECTED["sd2"]["input_ids"])
    # SD 2.x's pad token "!" is a special token in transformers: every "!" becomes id 0
    assert (sd2[j] == 0).sum() > (77 - EXPECTED["sd2"]["untruncated_lengths"][j])


def test_single_prompt_and_empty_list():
    tok = CLIPTokenizer.from_folder(FIXTURES / "sd1")
    ids, mask = tok("a photograph of an astronaut riding a horse")
    np.testing.assert_array_equal(ids[0], EXPECTED["sd1"]["input_ids"][0])
    assert ids.shape == (1, 77)
    ids, mask = tok([])
    assert ids.shape == mask.shape == (0, 77)
    assert tok.tokens("a cat")[0] == "<|startoftext|>" and tok.tokens("a cat")[-1] == "<|endoftext|>"
    with pytest.raises(ValueError, match="prompts must be"):
        tok(["ok", 3])


def test_incomplete_folders_are_refused(tmp_path):
    with pytest.raises(TokenizerConfigError, match="no such tokenizer folder"):
        load_tokenizer(tmp_path / "none")
    shutil.copytree(FIXTURES / "sd1", tmp_path / "t")
    (tmp_path / "t" / "merges.txt").unlink()
    with pytest.raises(TokenizerConfigError, match="expected vocab.json and merges.txt"):
        load_tokenizer(tmp_path / "t")
    shutil.copytree(FIXTURES / "sd1", tmp_path / "u")
    config = json.loads((tmp_path / "u" / "tokenizer_config.json").read_text())
    config["model_max_length"] = int(1e30)
    (tmp_path / "u" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerConfigError, match="model_max_length"):
        load_tokenizer(tmp_path / "u")
    shutil.copytree(FIXTURES / "sd1", tmp_path / "v")
    (tmp_path / "v" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(TokenizerConfigError, match="pad_token '<pad>' is not in the vocabulary"):
        load_tokenizer(tmp_path / "v")


def test_merges_outside_the_vocabulary_name_the_file_and_the_pair(tmp_path):
    shutil.copytree(FIXTURES / "sd1", tmp_path / "t")
    merges = tmp_path / "t" / "merges.txt"
    lines = merges.read_text(encoding="utf-8").splitlines()
    merges.write_text("\n".join(lines[:3] + ["qz@ xj@"] + lines[3:]) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerConfigError) as e:
        load_tokenizer(tmp_path / "t")
    msg = str(e.value)
    assert msg.startswith(f"{merges}: merge 3 ('qz@', 'xj@'): 'qz@' is not in the vocabulary") and "\n" not in msg


def test_the_text_truncation_drops_is_reported():
    tok = load_tokenizer(FIXTURES / "sd1")
    long = " ".join(["a"] * 80) + " bicycle"
    assert tok.dropped(["a cat", long]) == ["", "a a a a a bicycle"]  # 75 words fit between start and end
    ids, _ = tok([long])
    assert ids[0, 75] == tok(["a"])[0][0, 1] and ids[0, 76] == tok.eos_token_id
