"""After `lowbit finetune`: does the adapter load in HF peft, and what did it change?

Loads the packaged SmolLM2-135M-Instruct three ways and answers held-out questions greedily with each:
  - base: the float32 model, no adapter;
  - HF peft: `peft.PeftModel.from_pretrained(float32 base, OUT/adapter)` (the peer reads lowbit's files);
  - lowbit QLoRA: the NF4 + double-quant model the adapter was trained on, `lowbit.peft.load_adapter`.
It checks that lowbit's own loader on the float32 base computes the same logits as peft's, and prints the
validation loss of each model (the trainer's loss: assistant tokens only).

    python bench/adapter_check.py /tmp/ft/run --data data/instruct/validation.jsonl
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lowbit  # noqa: E402
from lowbit.io.loading import load_model  # noqa: E402
from lowbit.train import DataConfig, build_examples, read_records  # noqa: E402
from lowbit.train.trainer import evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the finetune --out folder (holds adapter/)")
    parser.add_argument("--data", type=Path, default=Path("data/instruct/validation.jsonl"))
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--max-new", type=int, default=60)
    parser.add_argument("--eval-examples", type=int, default=64)
    args = parser.parse_args()
    import peft

    base, tok = load_model("smollm2-135m")
    adapter = args.run / "adapter"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    ours_fp32 = lowbit.peft.load_adapter(copy.deepcopy(base), adapter)
    qlora = copy.deepcopy(base)
    lowbit.quantize(qlora, lowbit.QuantConfig(format="nf4", block_size=64, double_quant=True))  # in place
    lowbit.peft.load_adapter(qlora, adapter)

    records = read_records(args.data)
    examples, _ = build_examples(records, tok, DataConfig(max_length=256))
    ids = torch.tensor([examples[0]["input_ids"]])
    with torch.no_grad():
        diff = (theirs(input_ids=ids).logits - ours_fp32(input_ids=ids).logits).abs().max().item()
        moved = (theirs(input_ids=ids).logits - base(input_ids=ids).logits).abs().max().item()
    print(f"HF peft vs lowbit.load_adapter on the float32 base: max |Δlogit| {diff:.2e} "
          f"(the adapter moves logits by up to {moved:.2f})")  # fmt: skip
    assert diff < 1e-3, "HF peft and lowbit disagree on the adapter"

    models = {"base": base, "HF peft (fp32 base + adapter)": theirs, "lowbit QLoRA (NF4 + adapter)": qlora}
    evals = examples[: args.eval_examples]
    for name, model in models.items():
        loss = evaluate(model, evals, batch_size=8, pad_token_id=tok.pad_token_id)["eval_loss"]
        print(f"validation loss ({len(evals)} examples) {name}: {loss:.4f}")
    for record in records[: args.questions]:
        question = next(m["content"] for m in record["messages"] if m["role"] == "user")
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
        print(f"\n### {question}")
        for name, model in models.items():
            text = lowbit.generate.generate(model, tok, prompt, max_new_tokens=args.max_new)
            print(f"-- {name}: {' '.join(text.split())}")


if __name__ == "__main__":
    main()
