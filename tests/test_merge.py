"""merge(): a compressed model back to a plain transformers model with dense weights (issue 13,
item 4), on random-weight tiny BERT, GPT-2 and T5 models: no compressed layer is left, the
outputs and the parameter count are the compressed model's and the dense model's, a
save_pretrained folder loads into the model's own class (GPT-2's Conv1D and every tie
restored)."""

import warnings

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from mpotn import compress
from mpotn.compression.architectures import as_linear
from mpotn.compression.config import COMPRESSED_LAYERS
from mpotn.compression.merge import merge
from mpotn.layers import MPOEmbedding, MPOLinear, TiedMPOLinear

TARGETS = ["attention", "ffn", "embeddings"]
BERT = tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48)
GPT2 = tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2)
T5 = tf.T5Config(vocab_size=97, d_model=32, num_layers=2, num_heads=2, d_ff=48, d_kv=16,
                 decoder_start_token_id=0)
#: ``name: (model class, config, compress settings)``
CASES = {
    "bert": (tf.BertModel, BERT, {"targets": TARGETS}),
    "bert-tucker": (tf.BertModel, BERT, {"targets": ["ffn"], "method": "tucker"}),
    "gpt2": (tf.GPT2LMHeadModel, GPT2, {"targets": TARGETS}),
    "t5": (tf.T5ForConditionalGeneration, T5, {"targets": TARGETS}),
}
IDS = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def _build(case: str) -> nn.Module:
    cls, config, _ = CASES[case]
    torch.manual_seed(0)
    return cls(config).eval()


def _compress(model: nn.Module, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compress(model, n=3, ratio=0.5, progress=False, **settings)


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=IDS, decoder_input_ids=IDS).logits
        out = model(input_ids=IDS)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared parameters once


def _merged(case: str):
    """``(original parameter count, compressed outputs, merged model)``."""
    model = _build(case)
    original = _count(model)
    compressed = _compress(model, **CASES[case][2])
    assert compressed.compressed_layers()  # something to merge
    return original, _outputs(compressed), merge(compressed)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_gives_a_dense_model_with_the_compressed_outputs_that_saves_and_loads(case,
                                                                                  tmp_path):
    original, expected, merged = _merged(case)
    assert type(merged) is CASES[case][0]
    assert not [n for n, m in merged.named_modules() if isinstance(m, COMPRESSED_LAYERS)]
    assert not merged.training
    torch.testing.assert_close(_outputs(merged), expected, atol=1e-6, rtol=0)
    assert _count(merged) == original
    merged.save_pretrained(tmp_path)
    loaded, info = type(merged).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    torch.testing.assert_close(_outputs(loaded.eval()), expected, atol=1e-6, rtol=0)


def test_gpt2_gets_its_conv1d_layers_and_its_tied_head_back(tmp_path):
    _, _, merged = _merged("gpt2")
    for block in merged.transformer.h:
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert type(layer) is Conv1D
    assert tuple(merged.transformer.h[0].mlp.c_fc.weight.shape) == (32, 4 * 32)  # in x out
    assert type(merged.lm_head) is nn.Linear
    assert merged.lm_head.weight is merged.transformer.wte.weight
    merged.save_pretrained(tmp_path)
    loaded = tf.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    torch.testing.assert_close(loaded.transformer.wte.weight, merged.transformer.wte.weight,
                               atol=0, rtol=0)


def test_a_base_its_config_cannot_rebuild_merges_to_nn_linear_with_a_warning():
    import copy

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(copy.deepcopy(GPT2)).eval()  # its own config, edited below
    compressed = _compress(model, **CASES["gpt2"][2])
    expected = _outputs(compressed)
    compressed.base_model.config.n_head = 5  # 32 is not divisible by 5: cannot be built
    with pytest.warns(UserWarning, match=r"could not build a GPT2LMHeadModel from its config "
                                         r"to find its Conv1D layers .*becomes nn\.Linear"):
        merged = merge(compressed)
    assert type(merged.transformer.h[0].mlp.c_fc) is nn.Linear
    torch.testing.assert_close(_outputs(merged), expected, atol=1e-5, rtol=1e-5)


def test_t5_keeps_shared_embed_tokens_and_lm_head_tied(tmp_path):
    _, _, merged = _merged("t5")
    shared = merged.shared
    assert type(shared) is nn.Embedding
    assert merged.encoder.embed_tokens is shared and merged.decoder.embed_tokens is shared
    assert merged.lm_head.weight is shared.weight
    merged.save_pretrained(tmp_path)
    loaded = tf.T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight
    assert loaded.lm_head.weight is loaded.shared.weight


def test_the_bert_tucker_case_merges_only_its_ffn_and_keeps_padding_idx():
    model = _build("bert")
    padding = model.embeddings.word_embeddings.padding_idx
    merged = merge(_compress(model, targets=["ffn", "embeddings"], method="tucker"))
    layer = merged.encoder.layer[0].intermediate.dense
    assert type(layer) is nn.Linear and layer.bias is not None
    embedding = merged.embeddings.word_embeddings
    assert type(embedding) is nn.Embedding and embedding.padding_idx == padding


def test_merge_copies_weights_and_keeps_trainable_states_and_modes():
    model = _build("gpt2")
    compressed = _compress(model, targets=TARGETS)
    base = compressed.base_model
    base.train()
    for core in base.transformer.h[0].mlp.c_fc.cores:  # a frozen matrix stays frozen
        core.requires_grad_(False)
    base.transformer.h[1].mlp.c_fc.freeze_central()  # LFA: the auxiliary tensors train
    wte = base.transformer.wte
    wte.requires_grad_(False)  # the tied head follows its embedding
    wte.eval()
    weight = base.transformer.h[1].attn.c_attn.weight.detach().clone()
    merged = merge(base)  # a bare module works as the MPOModel does
    assert merged is base and merged.training
    assert not merged.transformer.h[0].mlp.c_fc.weight.requires_grad
    assert merged.transformer.h[0].mlp.c_fc.bias.requires_grad  # biases keep their own
    assert merged.transformer.h[1].mlp.c_fc.weight.requires_grad
    assert not merged.transformer.wte.weight.requires_grad
    assert not merged.lm_head.weight.requires_grad
    assert merged.transformer.h[0].attn.c_attn.training and not merged.transformer.wte.training
    conv = merged.transformer.h[1].attn.c_attn
    torch.testing.assert_close(conv.weight, weight.T, atol=0, rtol=0)
    assert conv.weight.grad_fn is None and conv.weight.is_leaf
    assert conv.weight.dtype == weight.dtype and conv.weight.device == weight.device


def test_a_plain_linear_where_gpt2_has_a_conv1d_becomes_a_conv1d_again():
    model = _build("gpt2")
    compressed = _compress(model, targets=["h.0.mlp.c_fc"])
    proj = model.transformer.h[1].mlp.c_proj
    model.transformer.h[1].mlp.c_proj = as_linear(proj)  # as compress converts targets
    before = _outputs(compressed)
    merged = merge(compressed)
    assert type(merged.transformer.h[1].mlp.c_proj) is Conv1D
    assert type(merged.transformer.h[0].mlp.c_fc) is Conv1D
    torch.testing.assert_close(_outputs(merged), before, atol=1e-6, rtol=0)


def test_modules_other_than_transformers_models_get_nn_linear_and_bare_layers_merge():
    torch.manual_seed(0)
    embedding = MPOEmbedding.from_embedding(nn.Embedding(40, 12), n=2)
    head = TiedMPOLinear("0", 12, 40)
    head.tie(embedding)
    model = nn.Sequential(embedding, nn.Linear(12, 12), head)
    ids = torch.randint(0, 40, (3, 4))
    with torch.no_grad():
        before = model(ids)
        merged = merge(model)
        torch.testing.assert_close(merged(ids), before, atol=1e-6, rtol=0)
    assert [type(m) for m in merged] == [nn.Embedding, nn.Linear, nn.Linear]
    assert merged[2].weight is merged[0].weight and merged[2].bias is None
    linear = MPOLinear.from_linear(nn.Linear(16, 8), n=2)
    dense = merge(linear)
    assert type(dense) is nn.Linear
    torch.testing.assert_close(dense.weight, linear.weight, atol=0, rtol=0)
