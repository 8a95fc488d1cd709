"""Protects the data contract: labels cover exactly the reply + EOS (checked with the REAL
Llama-2 tokenizer on every real hh-rlhf fixture row and on Airoboros-format records of every
kind), hh-rlhf is split at the final assistant turn, best-fit packing is sound, and packed
examples cannot attend to each other inside the model.

    .venv/bin/python -m pytest -q tests/test_data.py
"""

import gzip
import json
import random

import pytest
import torch

import qlora.data
import qlora.packing
from qlora.data import IGNORE
from conftest import FIXTURES

AIROBOROS_RECORDS = [
    ("contextual", "BEGININPUT\nBEGINCONTEXT\ndate: 2021-01-01\nurl: https://x.org\nENDCONTEXT\nThe sky was green.\n"
                   "ENDINPUT\nBEGININSTRUCTION\nWhat color was the sky? Cite.\nENDINSTRUCTION",
     "The sky was green.\nReference(s):\ndate: 2021-01-01\nurl: https://x.org"),
    ("coding", "Write a Python function to reverse a string. PLAINFORMAT",
     "def reverse(s):\n    return s[::-1]\n\n\nprint(reverse('abc'))  # cba"),
    ("multiline", "List three fruits.", "1. Apple\n2. Banana\n3. Cherry"),
    ("unicode", "Say hi in Japanese, Greek and with an emoji.", "こんにちは — Γειά σου 👋 ñ café"),
    ("agent", "Tools: Search[input]\nQuestion: Who wrote Hamlet?",
     "Plan: search.\n:evidence0: = Search[Hamlet author]\nAnswer: William Shakespeare"),
    ("spaces", "Reply with leading spaces kept inside.", "a  b   c\n\n\td"),
    ("special-looking", "Print the text </s> and <s>.", "Here: </s> and <s> are just text."),
    ("digits", "What is 1234 + 5678?", "1234 + 5678 = 6912"),
    ("long", "Repeat the word 'token' many times.", " ".join(["token"] * 3000)),
    ("starts-with-digit", "How many legs does a spider have?", "8 legs."),
    ("starts-with-quote", "Quote Hamlet.", "\"To be, or not to be\""),
    ("starts-with-code-fence", "Show a bash loop.", "```bash\nfor i in 1 2; do echo $i; done\n```"),
]


# Replies whose first characters are where a tokenization boundary goes wrong: sentencepiece's
# dummy prefix turns a separately encoded "The" into "▁The" and puts a lone "▁" (29871) before a digit.
REPLY_STARTS = [
    ("digit", "23 + 32 = 55."), ("punctuation", "...well, \"quoted\" (yes)!"), ("space", " leading space kept"),
    ("tab", "\tindented"), ("newline", "\nfirst line empty"), ("newlines", "\n\n- a\n- b"),
    ("cjk", "東京は日本の首都です。"), ("greek", "Γειά σου κόσμε"), ("emoji", "👋 hi"), ("cyrillic", "Привет"),
    ("symbol", "$100 (€92)"), ("hash", "### Not a turn"), ("word", "The sky is blue."), ("single", "a"),
]


def check_example(tok, prompt, reply, max_len=2048):
    """The trained example is exactly the prompt format as it tokenizes, and its labels are exactly
    the reply: ids == [BOS] + encode(prompt + reply) + [EOS], labelled = everything after the prompt."""
    (p_ids,) = tok.encode([prompt])
    (r_ids,) = qlora.data.encode_replies(tok, [prompt], [p_ids], [reply], ["test"])
    ids, labels, truncated = qlora.data.build_example(p_ids, r_ids, tok.eos_id, tok.bos_id, max_len)
    (joined,) = tok.encode([prompt + reply])
    assert len(ids) == len(labels) <= max_len
    if truncated:
        assert ids == ([tok.bos_id] + joined)[:max_len]
    else:
        assert ids == [tok.bos_id] + joined + [tok.eos_id], "the ids must be those of the joined text"
    n_prompt = 1 + len(p_ids)
    assert labels[:n_prompt] == [IGNORE] * n_prompt  # BOS + the prompt, exactly
    assert labels[n_prompt:] == ids[n_prompt:]  # and every token after it, the reply (+ EOS)
    labelled = labels[n_prompt:]
    # decoded WITH the prompt (alone, sentencepiece would drop a leading space): exactly the reply
    text = tok.decode(ids[1:n_prompt] + labelled)
    assert text[:len(prompt)] == prompt
    if not truncated:
        assert labelled[-1] == tok.eos_id, "the model must learn to stop"
        assert text[len(prompt):] == reply
    else:
        assert tok.eos_id not in labelled, "a cut reply must not teach stopping at the cut"
        assert reply.startswith(text[len(prompt):])
    # no stray dummy-prefix space: the first trained piece starts with "▁" only if the reply starts with " "
    assert tok.sp.id_to_piece(labelled[0]).startswith("▁") == reply.startswith(" "), tok.sp.id_to_piece(labelled[0])
    assert tok.pad_id != tok.eos_id
    return truncated


def test_reproduction_first_trained_token_is_the_reply_not_a_space(llama_tokenizer):
    """The bug report's case: a reply starting with a digit used to begin with a lone "▁" (29871)."""
    tok = llama_tokenizer
    prompt = qlora.data.format_prompt(["What is 23 + 32?"])
    (p_ids,) = tok.encode([prompt])
    (r_ids,) = qlora.data.encode_replies(tok, [prompt], [p_ids], ["23 + 32 = 55."], ["test"])
    ids, labels, _ = qlora.data.build_example(p_ids, r_ids, tok.eos_id, tok.bos_id, 2048)
    first = next(l for l in labels if l != IGNORE)
    assert first != 29871 and tok.sp.id_to_piece(first) == "2"
    assert tok.decode(ids).endswith("### Assistant:\n23 + 32 = 55.")
    assert tok.encode(["23 + 32 = 55."])[0][0] == 29871  # the separate encoding the fix avoids


@pytest.mark.parametrize("name,reply", REPLY_STARTS, ids=[r[0] for r in REPLY_STARTS])
def test_labels_exact_for_every_kind_of_reply_start(llama_tokenizer, name, reply):
    check_example(llama_tokenizer, qlora.data.format_prompt(["Answer."]), reply)
    # and after a multi-turn prompt, whose earlier assistant turn is tokenized the same way
    check_example(llama_tokenizer, qlora.data.format_prompt(["Hi", reply, "Again?"]), reply)


def test_a_prompt_that_is_not_a_token_prefix_is_refused(llama_tokenizer):
    """A prompt not ending in its own token would make the mask inexact: loud, naming the row."""
    with pytest.raises(SystemExit, match="rows.jsonl:7: the prompt's tokens are not a prefix"):
        prompt = "### Human:\nSay hello wor"  # no newline at the end: "▁wor" + "ld" merge into "▁world"
        (p_ids,) = llama_tokenizer.encode([prompt])
        qlora.data.encode_replies(llama_tokenizer, [prompt], [p_ids], ["ld"], ["rows.jsonl:7"])


def test_labels_exact_on_every_real_hh_rlhf_row(llama_tokenizer):
    path = FIXTURES / "hh-rlhf-harmless-base-test-head200.jsonl.gz"
    rows = [json.loads(line) for line in gzip.open(path, "rt")]
    assert len(rows) == 200
    checked = 0
    for row in rows:
        for side in ("chosen", "rejected"):
            try:
                turns, reply = qlora.data.split_hh(row[side])
            except ValueError as e:
                assert str(e) == "transcript ends on a Human turn"
                continue
            if not reply:
                continue
            check_example(llama_tokenizer, qlora.data.format_prompt(turns), reply)
            checked += 1
    assert checked >= 390


@pytest.mark.parametrize("category,instruction,response", AIROBOROS_RECORDS, ids=[r[0] for r in AIROBOROS_RECORDS])
def test_labels_exact_on_airoboros_records(llama_tokenizer, category, instruction, response):
    truncated = check_example(llama_tokenizer, qlora.data.format_prompt([instruction]), response)
    assert truncated == (category == "long")


def test_prompt_format_is_the_contract():
    assert qlora.data.format_prompt(["Hi"]) == "### Human:\nHi\n\n### Assistant:\n"
    assert qlora.data.format_prompt(["a", "b", "c"]) == "### Human:\na\n\n### Assistant:\nb\n\n### Human:\nc\n\n### Assistant:\n"


def test_split_hh_takes_the_final_assistant_turn_only():
    t = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is 2+2?\n\nAssistant: 4"
    assert qlora.data.split_hh(t) == (["hi", "hello", "what is 2+2?"], "4")
    with pytest.raises(ValueError, match="not a Human/Assistant transcript"):
        qlora.data.split_hh("no roles here")
    with pytest.raises(ValueError, match="transcript ends on a Human turn"):
        qlora.data.split_hh("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and then?")
    assert qlora.data.split_hh("\n\nHuman: hi\n\nAssistant:") == (["hi"], "")


def test_real_fixture_quirks_are_counted():
    """The fixture has empty replies and prompt mismatches; none may become a training pair."""
    path = FIXTURES / "hh-rlhf-harmless-base-test-head200.jsonl.gz"
    same = empty = 0
    for line in gzip.open(path, "rt"):
        row = json.loads(line)
        try:
            c, r = qlora.data.split_hh(row["chosen"]), qlora.data.split_hh(row["rejected"])
        except ValueError:
            continue
        same += c[0] != r[0]
        empty += (not c[1]) or (not r[1])
    assert same + empty > 0


def test_best_fit_packing_places_everything_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(20, 2048) for _ in range(2000)]
    bins = qlora.packing.pack_best_fit(lengths, 2048)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    efficiency = sum(lengths) / (len(bins) * 2048)
    assert efficiency > 0.9, efficiency


def test_packed_row_layout():
    ids, labels, pos = qlora.packing.make_packed_row([([1, 5, 6], [IGNORE, 5, 6]), ([1, 7], [IGNORE, 7])], 8, 0)
    assert ids == [1, 5, 6, 1, 7, 0, 0, 0]
    assert labels == [IGNORE, 5, 6, IGNORE, 7, IGNORE, IGNORE, IGNORE]
    assert pos == [0, 1, 2, 0, 1, 0, 1, 2]


def test_packed_examples_do_not_attend_to_each_other(demo_root):
    """Logits of each example inside a packed row == logits of that example alone."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(demo_root / "models/demo-llama", dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 500, (1, 37), generator=g), torch.randint(3, 500, (1, 21), generator=g)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(37), torch.arange(21)])[None]
    with torch.no_grad():
        lp = model(input_ids=packed, position_ids=pos, use_cache=False).logits
        la = model(input_ids=a, use_cache=False).logits
        lb = model(input_ids=b, use_cache=False).logits
    torch.testing.assert_close(lp[:, :37], la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp[:, 37:], lb, atol=1e-5, rtol=1e-5)
    # and the check has teeth: without position ids the second example does see the first
    with torch.no_grad():
        naive = model(input_ids=packed, use_cache=False).logits
    assert (naive[:, 37:] - lb).abs().max() > 1e-3
