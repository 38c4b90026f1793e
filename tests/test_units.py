"""Unit discovery, name-pattern units and grouping."""
import re

import pytest
import torch
import transformers as T
from torch import nn

from hift_ds import HiFTOptimizer
from hift_ds.units import discover_units, group_units, model_groups, param_numel, units_from_patterns

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
ARCHS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=2)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**SMALL, num_key_value_heads=2)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, num_key_value_heads=2)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                ffn_dim=64, vocab_size=100, max_position_embeddings=64,
                                                word_embed_proj_dim=32)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**SMALL)),
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**SMALL, num_labels=3)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**SMALL, num_labels=3)),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_discovery_covers_every_parameter_once(arch):
    model = ARCHS[arch]()
    units = discover_units(model)
    assert len(units) == 4  # embeddings, 2 blocks, head
    names = [n for u in units for n, _ in u.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    assert all(isinstance(dict(model.named_modules())[n.rsplit(".", 1)[0]], nn.Embedding)
               or "embeddings" in n for n, _ in units[0].params)
    head = [n for n, _ in units[-1].params]
    assert any("norm" in n or "ln_f" in n or "classifier" in n for n in head), head
    if arch in ("bert", "roberta"):
        assert any(n.startswith("classifier") for n in head)


# Per architecture: the block list, the embedding unit's parameters, the last unit's (final norm + head).
# A tied head (GPT-2, OPT, BERT-style MLM) shares the embedding weight and is listed with the embeddings.
MEMBERS = {
    "llama": ("model.layers", ["model.embed_tokens.weight"], ["model.norm.weight", "lm_head.weight"]),
    "mistral": ("model.layers", ["model.embed_tokens.weight"], ["model.norm.weight", "lm_head.weight"]),
    "qwen2": ("model.layers", ["model.embed_tokens.weight"], ["model.norm.weight", "lm_head.weight"]),
    "gpt2": ("transformer.h", ["transformer.wte.weight", "transformer.wpe.weight"],
             ["transformer.ln_f.weight", "transformer.ln_f.bias"]),
    "opt": ("model.decoder.layers", ["model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"],
            ["model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"]),
    "gpt_neox": ("gpt_neox.layers", ["gpt_neox.embed_in.weight"],
                 ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "lm_head.weight"]),
    "bert": ("bert.encoder.layer", [f"bert.embeddings.{n}" for n in (
        "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight", "LayerNorm.weight",
        "LayerNorm.bias")], ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                             "classifier.bias"]),
    "roberta": ("roberta.encoder.layer", [f"roberta.embeddings.{n}" for n in (
        "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight", "LayerNorm.weight",
        "LayerNorm.bias")], [f"classifier.{n}.{k}" for n in ("dense", "out_proj") for k in ("weight", "bias")]),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_units_hold_embeddings_then_each_block_in_order_then_norm_and_head(arch):
    """Unit 0 the embeddings, unit 1 + i exactly block i's parameters (the same objects), the last the norm and head."""
    model = ARCHS[arch]()
    blocks, embeddings, head = MEMBERS[arch]
    units = discover_units(model)
    assert (units[0].name, units[-1].name) == ("embeddings", "head")
    assert sorted(n for n, _ in units[0].params) == sorted(embeddings)
    assert sorted(n for n, _ in units[-1].params) == sorted(head)
    stack = model.get_submodule(blocks)
    assert [u.name for u in units[1:-1]] == [f"{blocks}.{i}" for i in range(len(stack))]
    for i, (unit, block) in enumerate(zip(units[1:-1], stack)):
        expected = [(f"{blocks}.{i}.{n}", p) for n, p in block.named_parameters()]
        assert [n for n, _ in unit.params] == [n for n, _ in expected], f"unit {i + 1} is not block {i}"
        assert all(p is q for (_, p), (_, q) in zip(unit.params, expected)), f"unit {i + 1} holds other tensors"

def test_tied_lm_head_belongs_to_embeddings_and_updates_once():
    model = ARCHS["gpt2"]()
    assert model.lm_head.weight is model.transformer.wte.weight
    units = discover_units(model)
    assert "transformer.wte.weight" in [n for n, _ in units[0].params]
    assert all("lm_head" not in n for u in units for n, _ in u.params)
    # One SGD step on the embedding group moves the tied weight by exactly lr * grad, once.
    opt = HiFTOptimizer(model, "sgd", lr=0.1)
    before = model.transformer.wte.weight.detach().clone()
    x = torch.randint(0, 100, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    grad = model.transformer.wte.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.lm_head.weight, before - 0.1 * grad)


def test_patterns_define_units(llama):
    pats = ["model.embed_tokens", "model.layers.0|model.layers.1", "model.layers.2", "model.norm|lm_head"]
    units = units_from_patterns(llama, pats)
    assert [len(u.params) for u in units][0] == 1
    assert sum(len(u.params) for u in units) == len(list(llama.parameters()))


def whole(message: str) -> str:
    """A pattern for pytest.raises(match=) that matches exactly ``message``."""
    return "^" + re.escape(message) + "$"


def test_pattern_errors(llama):
    with pytest.raises(ValueError, match=whole(
            "units patterns leave 2 trainable parameter(s) out, e.g. ['model.norm.weight', 'lm_head.weight']; add a "
            "pattern for them or freeze them (requires_grad=False) before building HiFT")):
        units_from_patterns(llama, ["model.embed_tokens", "model.layers.*"])
    names = [n for n, _ in llama.named_parameters()][1:]
    with pytest.raises(ValueError, match=re.escape(f"leave {len(names)} trainable parameter(s) out, e.g. {names[:5]};")):
        units_from_patterns(llama, ["model.embed_tokens"])  # the first five of many
    doubled = [f"{n} (matched by 'model.*', 'model.layers.0')" for n, _ in llama.model.layers[0].named_parameters(
        prefix="model.layers.0")][:5]
    with pytest.raises(ValueError, match=whole(
            f"parameters matched by more than one units pattern: {doubled}; make the patterns disjoint so every "
            "parameter belongs to exactly one unit")):
        units_from_patterns(llama, ["model.*", "model.layers.0", "lm_head"])
    with pytest.raises(ValueError, match=whole(
            "units pattern(s) ['decoder.*'] match no trainable parameter; remove or fix them")):
        units_from_patterns(llama, ["model.*", "decoder.*", "lm_head"])
    for bad in ("model.*", [], ["model.*", 3]):
        with pytest.raises(TypeError, match=whole(f"units must be a non-empty list of name patterns (strings), got "
                                                  f"{bad!r}")):
            units_from_patterns(llama, bad)


def test_unknown_architecture_asks_for_patterns():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=whole(
            "cannot find the transformer blocks of Sequential: no nn.ModuleList of identical blocks; pass units=[...] "
            "(hift config 'units'), one module-name pattern per unit in bottom-to-top order, e.g. ['embed', "
            "'layers.0', 'layers.1', 'norm|head']")):
        discover_units(model)
    opt = HiFTOptimizer(model, "sgd", units=["0", "2"], lr=0.1)
    assert opt.num_groups == 2


def test_no_trainable_parameters(llama):
    llama.requires_grad_(False)
    with pytest.raises(ValueError, match=whole(
            "LlamaForCausalLM has no trainable parameters (every requires_grad is False); unfreeze the parameters "
            "HiFT should train before building the optimizer")):
        discover_units(llama)


def test_parameters_frozen_by_a_previous_hift_wrapper_still_count(llama):
    HiFTOptimizer(llama, "sgd", lr=0.1)  # freezes every group but the first
    assert sum(p.requires_grad for p in llama.parameters()) < len(list(llama.parameters()))
    assert [len(u.params) for u in discover_units(llama)] == [1, 9, 9, 9, 2]


def test_one_block_and_root_parameters():
    """A one-block stack is still the block list; a parameter on the model itself belongs to the head unit."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.layers = nn.ModuleList([nn.Linear(4, 4)])
            self.scale = nn.Parameter(torch.ones(4))

    units = discover_units(Net())
    assert [[n for n, _ in u.params] for u in units] == [["embed.weight"], ["layers.0.weight", "layers.0.bias"],
                                                         ["scale"]]


class _Block(nn.Module):
    def __init__(self, experts: int = 0):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(experts)]) if experts else None


def test_block_list_is_the_largest_stack_and_a_rival_of_half_its_size_is_refused():
    def model(rival_out: int = 0, **stacks):
        m = nn.Module()
        m.layers = nn.ModuleList([_Block() for _ in range(4)])  # 4 x 72 = 288 parameters
        m.rival = nn.ModuleList([nn.Linear(8, rival_out)] if rival_out else [])  # 9 * rival_out parameters
        for name, stack in stacks.items():
            setattr(m, name, stack)
        return m

    # No embeddings here; a stack of 108 parameters (over a third, under half) lands in the head unit.
    assert [u.name for u in discover_units(model(12))] == [f"layers.{i}" for i in range(4)] + ["head"]
    with pytest.raises(ValueError, match=re.escape("Module has several stacks of transformer blocks: layers (4 blocks), "
                                                   "rival (1 blocks) (an encoder-decoder?)")):
        discover_units(model(16))  # 144: exactly half the size
    # Two equal stacks: both named, the first one in the model first.
    with pytest.raises(ValueError, match=re.escape("stacks of transformer blocks: layers (4 blocks), zz (4 blocks)")):
        discover_units(model(zz=nn.ModuleList([_Block() for _ in range(4)])))
    # A stack inside the blocks (mixture-of-experts) is part of them, not a rival, whatever its size.
    moe = nn.Module()
    moe.layers = nn.ModuleList([_Block(experts=8)])
    assert [u.name for u in discover_units(moe)] == ["layers.0"]


def test_grouping(llama):
    units = discover_units(llama)  # 5 units
    assert [len(g) for g in group_units(units)] == [1] * 5
    assert [len(g) for g in group_units(units, None)] == [1] * 5
    assert [len(g) for g in group_units(units, None, num_groups=1)] == [5]
    assert [len(g) for g in group_units(units, 2)] == [2, 2, 1]
    assert [len(g) for g in group_units(units, 5)] == [5]
    assert [len(g) for g in group_units(units, None, num_groups=3)] == [2, 1, 2]
    assert [len(g) for g in group_units(units, None, num_groups=5)] == [1] * 5
    for bad in (0, -1, 6):
        with pytest.raises(ValueError, match=whole(f"group_size={bad} must be an integer between 1 and the unit count "
                                                   "5 (units: embeddings, each block, head)")):
            group_units(units, bad)
    with pytest.raises(ValueError, match="num_groups"):
        group_units(units, None, num_groups=6)
    with pytest.raises(ValueError, match="not both"):
        group_units(units, 2, num_groups=2)


def test_shuffled_groups_are_cut_from_the_units_shuffled_once_by_the_seed(llama):
    """Strategy "shuffled" (the official HiFT code's random): one seeded shuffle of the units, then groups of it."""
    units, groups = model_groups(llama, None, 2, None, shuffle_seed=7)
    assert [u.name for u in units] == ["embeddings", "model.layers.0", "model.layers.1", "model.layers.2", "head"]
    # pinned: the same seed gives the same groups in every process (a string seed, not hash()-dependent)
    assert [[u.name for u in g] for g in groups] == [["model.layers.1", "head"], ["model.layers.0", "model.layers.2"],
                                                     ["embeddings"]]
    assert [[u.name for u in g] for g in model_groups(llama, None, None, 2, shuffle_seed=0)[1]] == \
        [["head", "model.layers.1"], ["embeddings", "model.layers.0", "model.layers.2"]]
    opt = HiFTOptimizer(llama, "sgd", lr=0.1, group_size=2, strategy="shuffled", seed=7)
    assert [opt.group_units(i) for i in range(opt.num_groups)] == [[u.name for u in g] for g in groups]
    assert [u.name for u in opt.units] == [u.name for u in units]  # model order
    assert opt.schedule.order(0) == opt.schedule.order(5) == [0, 1, 2]  # one fixed order of groups, every cycle


def test_encoder_decoder_asks_for_patterns_instead_of_a_lopsided_split():
    t5 = T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                 num_decoder_layers=2, num_heads=2))
    with pytest.raises(ValueError, match=whole(
            "T5ForConditionalGeneration has several stacks of transformer blocks: decoder.block (2 blocks), "
            "encoder.block (2 blocks) (an encoder-decoder?); automatic unit discovery handles one stack. Pass "
            "units=[...] (hift config 'units'), one module-name pattern per unit in bottom-to-top order, e.g. "
            "['shared|*embed*', 'encoder.block.0', ..., 'decoder.block.0', ..., '*final_layer_norm|lm_head']")):
        discover_units(t5)
    patterns = ["shared", "encoder.block.0", "encoder.block.1", "encoder.final_layer_norm|decoder.block.0",
                "decoder.block.1", "decoder.final_layer_norm|lm_head"]
    opt = HiFTOptimizer(t5, "adamw", units=patterns)  # the documented way out works
    assert opt.num_groups == len(patterns)


def test_sizes_count_zero3_partitioned_parameters():
    """Under ZeRO-3 a parameter's data is empty and its size is ds_numel: the units and the block stack count it."""
    whole, part = nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.empty(0))
    part.ds_numel = 12
    assert param_numel(whole) == 12 and param_numel(part) == 12
    model = ARCHS["llama"]()
    expected = [(u.name, u.numel) for u in discover_units(model)]
    for p in model.parameters():
        p.ds_numel = p.numel()
        p.data = torch.empty(0, dtype=p.dtype)
    assert [(u.name, u.numel) for u in discover_units(model)] == expected
