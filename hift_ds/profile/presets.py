"""Model presets shared by the profiler and the benchmarks (LLaMA shapes built from a config), and model options."""
from __future__ import annotations

import torch

PRESETS = {
    # hidden, layers, intermediate, heads, kv heads, vocab
    "tiny": dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
}


def build_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
                max_positions: int = 4096):
    """A causal LM: a preset built from its config (random init, seeded) or a HF name/path."""
    import transformers

    torch.manual_seed(seed)
    if name in PRESETS:
        cfg = transformers.LlamaConfig(**PRESETS[name], max_position_embeddings=max_positions)
        # Build directly in the target dtype and on the target device: an fp32 7B model built
        # first and cast afterwards would need ~27 GB more than the bf16 one at its peak.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return transformers.LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(previous)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, torch_dtype=dtype)
    return model.to(device)


def random_batch(vocab_size: int, batch_size: int, seq_len: int, step: int, device="cpu") -> torch.Tensor:
    """Token ids for ``step``, the same in every mode and process (seeded by the step)."""
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=g).to(device)


def full_finetune(model, lr: float, amp: torch.dtype, weight_decay: float = 0.01):
    """The full fine-tuning baseline on an fp32 model: (loss fn under autocast, step fn, torch AdamW)."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                            fused=True if device.type == "cuda" else None)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            return model(input_ids=ids, labels=ids).loss

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return forward, step, opt
