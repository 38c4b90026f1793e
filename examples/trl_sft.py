"""Supervised fine-tuning of a causal LM with TRL's SFTTrainer, switched to HiFT by one line.

    python examples/trl_sft.py                         # HiFT, CPU, a few minutes (defaults: see common.py)
    python examples/trl_sft.py --mode fpft             # the same job with the plain SFTTrainer
    torchrun --nproc_per_node 2 examples/trl_sft.py    # several processes
    python examples/trl_sft.py --deepspeed ds_configs/trainer/hift.json

The records become a prompt/completion dataset, so the loss is on the completion only (TRL's
default). Prints the eval loss and the exact-match rate of greedy completions before and after
training, and saves the model and tokenizer under --output-dir/final.
"""
import datasets
import trl

import common
from hift_ds.hf import HiFTSFTTrainer


def main() -> None:
    args = common.parse_args(__doc__.split("\n")[0])
    train, held_out = common.instruction_records(args.data, args.seed)
    tokenizer, model = common.load_model(args.model, [common.prompt_of(r) + str(r["output"]) for r in train],
                                         args.seed)

    def as_dataset(records: list[dict]) -> datasets.Dataset:
        return datasets.Dataset.from_list([{"prompt": common.prompt_of(r), "completion": str(r["output"])}
                                           for r in records])

    config = trl.SFTConfig(**common.training_kwargs(args), max_length=args.max_length)
    data = dict(train_dataset=as_dataset(train), eval_dataset=as_dataset(held_out), processing_class=tokenizer)
    if args.mode == "fpft":
        trainer = trl.SFTTrainer(model=model, args=config, **data)
    else:  # the one changed line: HiFTSFTTrainer instead of SFTTrainer, plus the hift settings
        trainer = HiFTSFTTrainer(model=model, args=config, **data,
                                 hift={"group_size": args.group_size, "strategy": args.strategy})

    common.train_and_report(trainer, tokenizer, held_out, args)


if __name__ == "__main__":
    main()
