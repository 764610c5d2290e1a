"""Fine-tune OLMoE with TRL and moe-sieve: profile -> select -> SFTTrainer -> evaluate.

    python examples/trl_olmoe.py --model allenai/OLMoE-1B-7B-0125 --data gsm8k --out runs/trl-olmoe

needs a GPU for the 7B model; the test suite runs the same script on the embedded 4-layer OLMoE and the
arithmetic mini task (``--model moe-sieve-default --data gsm8k:DIR``) in seconds on a CPU. See docs/trl.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import moe_sieve
from moe_sieve.data.sft import load_sft_examples
from moe_sieve.evaluation import evaluate
from moe_sieve.modeling import ModelSpec, load_model, load_tokenizer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="allenai/OLMoE-1B-7B-0125")
    parser.add_argument("--data", default="gsm8k", help="a moe-sieve task: gsm8k, TASK:PATH, ...")
    parser.add_argument("--out", default="runs/trl-olmoe")
    parser.add_argument("--k", default="25%", help="experts per layer to adapt (count or share)")
    parser.add_argument("--profile-examples", type=int, default=500)
    parser.add_argument("--train-examples", type=int, default=None)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    spec = ModelSpec(args.model, device=args.device, dtype="auto")
    model, tokenizer = load_model(spec), load_tokenizer(spec)

    # 1. profile: which experts the task's tokens are routed to
    profile = moe_sieve.run_profile(
        moe_sieve.ProfileConfig(model=args.model, data=args.data, split="train", max_examples=args.profile_examples),
        model=model,
        tokenizer=tokenizer,
    )
    profile.save(out / "profile", overwrite=True)

    # 2. select the k most-routed experts of every layer
    selection = moe_sieve.make_selection(profile.counts_LE, profile.mass_LE, k=args.k, layer_ids=profile.layer_ids)
    selection.save(out / "selection.json", overwrite=True)

    # 3. fine-tune with TRL: the adapter is a PEFT config like any other
    rows = load_sft_examples(args.data, split="train", max_examples=args.train_examples, tokenizer=tokenizer)
    train_dataset = Dataset.from_list([{"prompt": ex.prompt, "completion": ex.completion} for ex in rows])
    peft_config = moe_sieve.SieveConfig(
        selection=str(out / "selection.json"),
        profile=str(out / "profile"),  # for the model card's coverage and routing statistics
        r=args.r,
        lora_alpha=2 * args.r,
        lora_dropout=0.05,
        router_aux_loss_coef=0.0,  # moe-sieve's default: no load-balancing loss (TRL would add the model's own)
    )
    on_gpu = torch.cuda.is_available() and spec.device != "cpu"
    trainer = SFTTrainer(
        model=model,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        args=SFTConfig(
            output_dir=str(out / "checkpoints"),
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            bf16=on_gpu and model.dtype == torch.bfloat16,
            use_cpu=not on_gpu,
            gradient_checkpointing=on_gpu,
        ),
    )
    trainer.model.print_trainable_parameters()
    trainer.train()

    # 4. evaluate the adapted model on the held-out split, record it in the model card, save
    result = evaluate(trainer.model, tokenizer, args.data, max_examples=args.eval_examples, progress=False)
    print(f"{result.task}: accuracy {result.accuracy:.4f} on {result.n} examples")
    trainer.model.record_card(training={"data": args.data, "examples": len(rows)}, eval_result=result)
    trainer.model.save_pretrained(out / "adapter")
    summary = {"accuracy": result.accuracy, "n": result.n, "steps": trainer.state.global_step}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
