"""Instruction fine-tuning of a causal LM with the Hugging Face Trainer, switched to HiFT by one line.

    python examples/hf_trainer.py                      # HiFT, CPU, a few minutes (defaults: see common.py)
    python examples/hf_trainer.py --mode fpft          # the same job with the plain Trainer
    torchrun --nproc_per_node 2 examples/hf_trainer.py # several processes (DDP; HiFT reduces the active group)
    python examples/hf_trainer.py --deepspeed ds_configs/trainer/hift.json   # through hift_ds.initialize's engine

Prints the eval loss and the exact-match rate of greedy completions before and after training,
and saves the model and tokenizer under --output-dir/final.
"""
import transformers

import common
from hift_ds.train import data as D
from hift_ds.hf import HiFTTrainer


def main() -> None:
    args = common.parse_args(__doc__.split("\n")[0])
    train, held_out = common.instruction_records(args.data, args.seed)
    tokenizer, model = common.load_model(args.model, [common.prompt_of(r) + str(r["output"]) for r in train],
                                         args.seed)
    training_args = transformers.TrainingArguments(**common.training_kwargs(args))
    data = dict(train_dataset=D.encode_instruction(train, tokenizer, args.max_length, "train"),
                eval_dataset=D.encode_instruction(held_out, tokenizer, args.max_length, "eval"))
    if args.mode == "fpft":
        trainer = transformers.Trainer(model=model, args=training_args, **data)
    else:  # the one changed line: HiFTTrainer instead of Trainer, plus the hift settings
        trainer = HiFTTrainer(model=model, args=training_args, **data,
                              hift={"group_size": args.group_size, "strategy": args.strategy})

    common.train_and_report(trainer, tokenizer, held_out, args)


if __name__ == "__main__":
    main()
