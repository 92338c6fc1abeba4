"""Cached generation of a prompt-learning model, checked against peft's uncached forward."""

import torch

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


def assert_generate_matches_peft_forward(reference, model, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """``model.generate`` (lowbit's adapter, KV cache) against ``reference``, peft's model of the same adapter:
    every step's logits equal peft's forward over the whole sequence so far, and each token is their argmax.

    The reference is peft's forward, not its ``generate``: under transformers ≥ 5.24, peft 0.21's cached decoding
    of prompt-learning models drifts from its own forward (by ~0.1 in the logits from the second step on).
    """
    out = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    width = ids.shape[1]
    for step, logits in enumerate(out.logits):
        seq = out.sequences[:, : width + step]
        seq_mask = torch.cat([mask, mask.new_ones(mask.shape[0], step)], dim=1)
        with torch.no_grad():
            want = reference(input_ids=seq, attention_mask=seq_mask).logits[:, -1]
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
        assert torch.equal(out.sequences[:, width + step], logits.argmax(-1))
