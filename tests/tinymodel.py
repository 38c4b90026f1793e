"""A tiny saved BERT classifier/Llama LM with a word-level tokenizer, and JSONL data, for train.py tests."""
import json
import os
import random

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ["good", "great", "fine", "happy", "love", "bad", "awful", "sad", "hate", "poor", "the", "movie", "was",
         "a", "plot", "very", "not", "and", "it", "is"]


def _tokenizer(out: str, **special) -> transformers.PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", **special)
    fast.save_pretrained(out)
    return fast


def make_classifier(out: str, layers: int = 2) -> str:
    """Save a randomly initialised tiny BertForSequenceClassification with its tokenizer to ``out``."""
    tok = _tokenizer(out, cls_token="[CLS]", sep_token="[SEP]")
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(out)
    return out


def make_causal_lm(out: str) -> str:
    """Save a tiny LlamaForCausalLM with its tokenizer to ``out``."""
    tok = _tokenizer(out, eos_token="</s>")
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=4, bos_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def sentiment_jsonl(path: str, n: int = 200, seed: int = 0) -> str:
    """A learnable two-class data set: label 1 iff the text holds a positive word."""
    rng = random.Random(seed)
    pos, neg, filler = WORDS[:5], WORDS[5:10], WORDS[10:]
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(filler, 4) + [rng.choice(pos if label else neg)]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def instruction_jsonl(path: str, n: int = 40) -> str:
    """Instruction records: repeat a word."""
    with open(path, "w") as f:
        for i in range(n):
            w = WORDS[i % len(WORDS)]
            f.write(json.dumps({"instruction": "the movie", "input": w, "output": f"{w} {w}"}) + "\n")
    return path


if __name__ == "__main__":
    import sys
    os.makedirs(sys.argv[1], exist_ok=True)
    make_classifier(os.path.join(sys.argv[1], "model"))
    sentiment_jsonl(os.path.join(sys.argv[1], "data.jsonl"))
