"""Stop strings, streaming, chat templates and few-shot prompts, with SmolLM2's real tokenizer."""

import json

import pytest

from lowbit.generate import (
    ChatSession,
    FewShotTemplate,
    GenerateConfig,
    TextStream,
    chat_loop,
    generate,
    generate_ids,
    load_few_shot,
    render_chat,
    stream,
)

PROMPT = "The quick brown fox"


@pytest.mark.parametrize("stop, beams", [("e", 1), ("s SA", 1), ("e", 3)])  # "s SA" spans two tokens here
def test_stop_strings_match_transformers(smol_tiny, stop, beams):
    model, tok = smol_tiny
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, num_beams=beams, max_new_tokens=40, stop_strings=[stop], tokenizer=tok,
                         pad_token_id=tok.pad_token_id)[0, ids.shape[1] :].tolist()  # fmt: skip
    cfg = GenerateConfig(max_new_tokens=40, num_beams=beams, stop_strings=(stop,))
    got = generate_ids(model, ids, cfg, tokenizer=tok)[0]
    assert got == out and len(got) < 40  # it did stop on the string
    text = generate(model, tok, PROMPT, cfg)
    full = tok.decode(got, skip_special_tokens=True)
    assert stop not in text
    if stop in full:  # stopped on it: the text is everything before the stop string
        assert full.startswith(text) and full[len(text) :].startswith(stop)


def test_stream_pieces_join_to_the_generated_text(smol_tiny):
    model, tok = smol_tiny
    cfg = GenerateConfig(max_new_tokens=30, do_sample=True, seed=7, top_p=0.9, stop_strings=("e ",))
    pieces = list(stream(model, tok, PROMPT, cfg))
    assert len(pieces) > 1
    assert "".join(pieces) == generate(model, tok, PROMPT, cfg)
    seen = []
    assert generate(model, tok, PROMPT, cfg, on_text=seen.append) == "".join(pieces) and seen == pieces
    beam = GenerateConfig(max_new_tokens=8, num_beams=2)
    assert "".join(stream(model, tok, PROMPT, beam)) == generate(model, tok, PROMPT, beam)


def test_batched_text_generation_equals_one_by_one(smol_tiny):
    model, tok = smol_tiny
    prompts = ["Hello", "A much longer prompt than the first one"]
    together = generate(model, tok, prompts, max_new_tokens=10)
    assert together == [generate(model, tok, p, max_new_tokens=10) for p in prompts]


class FakeTokenizer:
    """Decodes ids to fixed strings, to drive TextStream through awkward token boundaries."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        data = b"".join(self.pieces[i] for i in ids)
        return data.decode("utf-8", errors="replace")


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    tok = FakeTokenizer([b"Hi ", "é".encode()[:1], "é".encode()[1:], b" EN", b"D!", b"more"])
    s = TextStream(tok, stop_strings=("END",))
    assert s.push(0) == "Hi "
    assert s.push(1) == ""  # half of a two-byte character
    assert s.push(2) == "é"
    assert s.push(3) == " "  # "EN" could be the start of "END": held back
    assert s.push(4) == "" and s.stopped and s.text == "Hi é "
    assert s.flush() == ""
    with pytest.raises(RuntimeError):
        s.push(5)
    s = TextStream(tok, stop_strings=("END",))
    assert [s.push(i) for i in (0, 3)] == ["Hi ", " "] and s.flush() == "EN"  # released once generation ends


def test_chat_template_and_session(smol_tiny):
    model, tok = smol_tiny
    messages = [{"role": "user", "content": "Hi"}]
    ids = render_chat(tok, messages)
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids[0]) == want and want.endswith("<|im_start|>assistant\n")
    session = ChatSession(model, tok, GenerateConfig(max_new_tokens=5), system="Be brief.")
    reply = session.send("Hi")
    assert session.history == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    second = session.messages("And then?")
    assert second[0] == {"role": "system", "content": "Be brief."} and second[1:3] == session.history
    replies = iter(["Hello", "/reset", "", "Again", "/exit"])
    written = []
    assert chat_loop(session, read=lambda _: next(replies), write=written.append) == 2
    assert "(history cleared)\n" in written and len(session.history) == 2


def test_few_shot_template(tmp_path, smol_tiny):
    path = tmp_path / "shots.json"
    path.write_text(json.dumps({"system": "One word.", "prompt": "Q: {input}\nA:",
                                "examples": [{"input": "Capital of France?", "output": "Paris"},
                                             {"input": "Capital of {Italy}?", "output": "Rome"}]}))  # fmt: skip
    shots = load_few_shot(path)
    assert shots.text("Capital of Spain?") == (
        "One word.\n\nQ: Capital of France?\nA: Paris\n\nQ: Capital of {Italy}?\nA: Rome\n\nQ: Capital of Spain?\nA:")
    msgs = shots.messages("Capital of Spain?")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == "Q: Capital of Spain?\nA:"
    model, tok = smol_tiny
    session = ChatSession(model, tok, GenerateConfig(max_new_tokens=3), few_shot=shots)
    assert session.messages("x")[:5] == msgs[:5]
    yaml_path = tmp_path / "shots.yaml"
    yaml_path.write_text("prompt: '{input} ->'\nexamples:\n  - {input: a, output: b}\n")
    assert load_few_shot(yaml_path) == FewShotTemplate(prompt="{input} ->", examples=(("a", "b"),))
    for bad in ({"prompt": "no placeholder"}, {"examples": [{"input": "a"}]}, {"shots": []}, [1]):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            load_few_shot(path)


def test_chat_needs_a_template():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="chat template"):
        render_chat(NoTemplate(), [{"role": "user", "content": "x"}])
