"""Reproduce moe-sieve's embedded default model: a small OLMoE pretrained on the generated corpus.

    python scripts/pretrain_default.py --out src/moe_sieve/default_model            # the shipped model
    python scripts/pretrain_default.py --out /tmp/m --max-steps 50 --work /tmp/w     # quick smoke run

Steps: generate the mini tasks and the mixed-domain corpus (seeded), train a byte-level BPE tokenizer on
the corpus, pack the corpus into fixed-length blocks and pretrain ``OlmoeForCausalLM`` with the
load-balancing loss on, using transformers' Trainer. Writes the model (safetensors), the tokenizer,
``pretrain_config.json`` (seed, sizes, hyper-parameters) and ``training_log.json`` (Trainer's log).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|endoftext|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def pack(texts: list[str], tokenizer, block: int) -> list[list[int]]:
    """Concatenate documents (bos ... eos) and cut into blocks, the usual causal-LM pretraining layout."""
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Directory for the pretrained model and tokenizer.")
    parser.add_argument("--work", default="runs/pretrain-work", help="Scratch directory (corpus, checkpoints).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=128)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--aux-loss", type=float, default=0.01, help="Load-balancing loss coefficient.")
    parser.add_argument("--corpus-docs", type=int, default=None, help="Override the corpus size (documents).")
    args = parser.parse_args()

    from transformers import OlmoeConfig, OlmoeForCausalLM, Trainer, TrainingArguments, set_seed

    from moe_sieve.data.sft import SFTCollator
    from moe_sieve.minitasks.generate import generate_minitasks

    set_seed(args.seed)
    work, out = Path(args.work), Path(args.out)
    sizes = {"corpus_train_docs": args.corpus_docs} if args.corpus_docs else None
    manifest = generate_minitasks(work / "minitasks", seed=args.seed, sizes=sizes)
    texts = [json.loads(line)["text"] for line in (work / "minitasks/corpus/train.jsonl").open()]
    started = time.time()
    tokenizer = train_tokenizer(texts, args.vocab_size)
    blocks = pack(texts, tokenizer, args.block)
    print(f"corpus: {len(texts)} docs, {len(blocks)} blocks of {args.block} tokens "
          f"({len(blocks) * args.block:,} tokens); tokenizer vocab {len(tokenizer)}", flush=True)

    config = OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.expert_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=1024,
        router_aux_loss_coef=args.aux_loss,
        output_router_logits=True,
        norm_topk_prob=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = OlmoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({4 * n_params / 2**20:.1f} MiB in fp32)", flush=True)

    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    targs = TrainingArguments(
        output_dir=str(work / "checkpoints"),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        max_steps=args.max_steps,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=25,
        save_strategy="no",
        seed=args.seed,
        data_seed=args.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=SFTCollator(tokenizer))
    trainer.train()
    model.config.output_router_logits = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    epochs = args.max_steps * args.batch_size / max(1, len(blocks))
    (out / "pretrain_config.json").write_text(json.dumps({
        "script": "scripts/pretrain_default.py",
        "args": vars(args),
        "corpus": {"docs": len(texts), "blocks": len(blocks), "tokens": len(blocks) * args.block,
                   "epochs": round(epochs, 3), "manifest": manifest.get("counts", manifest) if isinstance(manifest, dict)
                   else None},
        "parameters": n_params,
        "wall_time_s": round(time.time() - started, 1),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "torch": torch.__version__,
    }, indent=2, default=str) + "\n")
    log = [entry for entry in trainer.state.log_history]
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    final = [e["loss"] for e in log if "loss" in e] or [trainer.state.log_history[-1].get("train_loss", float("nan"))]
    print(f"done in {time.time() - started:.0f} s; loss {final[0]:.3f} -> {final[-1]:.3f} "
          f"(ppl {math.exp(final[-1]):.1f})", flush=True)


if __name__ == "__main__":
    main()
