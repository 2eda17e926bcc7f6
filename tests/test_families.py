"""Every architecture family of mpotn's matrix table, from random-weight configs: the
presets find every attention and FFN matrix, full-rank compression keeps the outputs
and greedy generation, and a save loads back exactly."""

import warnings

import pytest
import torch
import transformers as tf
from torch import nn

from mpotn import compress, load
from mpotn.compression.architectures import ARCHITECTURES, is_linear, matrix_type
from mpotn.layers import MPOEmbedding, TiedMPOLinear

SMALL = {"vocab_size": 97}
ENCODER = {**SMALL, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 48}
DECODER = {**ENCODER, "num_key_value_heads": 1}
BERT_TYPES = {"query", "key", "value", "attn_out", "ffn_in", "ffn_out"}
LLAMA_TYPES = BERT_TYPES | {"ffn_gate"}
FUSED_TYPES = {"qkv", "attn_out", "ffn_in", "ffn_out"}

#: ``model_type: (model class, config, attention and FFN types per layer)``
FAMILIES = {
    "bert": (tf.BertModel, tf.BertConfig(**ENCODER), BERT_TYPES),
    "roberta": (tf.RobertaModel, tf.RobertaConfig(**ENCODER), BERT_TYPES),
    "electra": (tf.ElectraModel, tf.ElectraConfig(**ENCODER, embedding_size=16), BERT_TYPES),
    "albert": (tf.AlbertModel, tf.AlbertConfig(**ENCODER, embedding_size=16), BERT_TYPES),
    "distilbert": (tf.DistilBertModel, tf.DistilBertConfig(
        vocab_size=97, dim=32, n_layers=2, n_heads=2, hidden_dim=48), BERT_TYPES),
    "mobilebert": (tf.MobileBertModel, tf.MobileBertConfig(
        **ENCODER, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16),
        BERT_TYPES),
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2),
             FUSED_TYPES),
    "gptj": (tf.GPTJForCausalLM, tf.GPTJConfig(vocab_size=97, n_embd=32, n_layer=2, n_head=2,
                                               rotary_dim=8), BERT_TYPES),
    "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**ENCODER), FUSED_TYPES),
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**DECODER), LLAMA_TYPES),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**DECODER), LLAMA_TYPES),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**DECODER), LLAMA_TYPES),
    "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**DECODER, head_dim=16), LLAMA_TYPES),
    "phi": (tf.PhiForCausalLM, tf.PhiConfig(**ENCODER), BERT_TYPES),
    "t5": (tf.T5ForConditionalGeneration, tf.T5Config(
        vocab_size=97, d_model=32, num_layers=2, num_heads=2, d_ff=48, d_kv=16,
        decoder_start_token_id=0), BERT_TYPES),
}
#: Linear layers inside the layer stack that are neither attention nor FFN.
OTHER_TYPES = {"bottleneck_in", "bottleneck_out"}
#: Families whose input embedding changes nn.Embedding's forward (a scale): not compressed.
SCALED_EMBEDDINGS = {"gemma"}
#: Linear layers outside the layer stack.
OUTSIDE = {"pooler", "emb_proj", "lm_head"}


def _build(model_type: str) -> nn.Module:
    cls, config, _ = FAMILIES[model_type]
    torch.manual_seed(0)
    return cls(config).eval()


def _outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids).logits
        out = model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _greedy(model: nn.Module, ids: torch.Tensor) -> list[int] | None:
    if not model.can_generate():
        return None
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              eos_token_id=None).tolist()


def test_the_family_table_covers_every_model_type_tested_here():
    covered = {t for types in ARCHITECTURES.values() for t in types}
    assert set(FAMILIES) <= covered


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_presets_find_every_attention_and_ffn_matrix(model_type):
    model = _build(model_type)
    expected = FAMILIES[model_type][2]
    assert set(_layered_types(model).values()) - OTHER_TYPES == expected
    names = _attention_ffn_names(model, model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied embeddings are reported, not compressed
        compressed = compress(model, targets=["attention", "ffn"], n=3, progress=False)
    assert {r["name"] for r in compressed.report()} == names


def _layered_types(model: nn.Module) -> dict[str, str]:
    """``{name: matrix type}`` of the linear layers inside the layer stack."""
    return {name: matrix_type(name) for name, m in model.named_modules()
            if is_linear(m) and matrix_type(name) not in OUTSIDE}


def _attention_ffn_names(model: nn.Module, model_type: str) -> set[str]:
    """The attention and FFN matrices of ``model``, by the family table's types."""
    return {n for n, t in _layered_types(model).items() if t in FAMILIES[model_type][2]}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_full_rank_compression_keeps_outputs_generation_and_saves(model_type, tmp_path,
                                                                  load_onto_meta):
    model = _build(model_type)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    before, greedy = _outputs(model, ids), _greedy(model, ids[:1])
    scaled = model_type in SCALED_EMBEDDINGS
    tied = (model.config.tie_word_embeddings and model.get_output_embeddings() is not None
            and not scaled)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # tied embeddings are compressed, not skipped
        compressed = compress(model, targets=["attention", "ffn", "embeddings"], n=3,
                              progress=False)
    base = compressed.base_model
    messages = [str(w.message) for w in caught]
    assert len(messages) == scaled, messages
    assert all("changes the forward pass of nn.Embedding" in m for m in messages)
    assert sum(isinstance(m, nn.Embedding) for m in base.modules()) == scaled
    assert isinstance(base.get_input_embeddings(), MPOEmbedding) != scaled
    head = base.get_output_embeddings()
    assert isinstance(head, TiedMPOLinear) == bool(tied)
    if tied:
        assert head.embedding is base.get_input_embeddings()
    after = _outputs(compressed.base_model, ids)
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)
    assert _greedy(compressed.base_model, ids[:1]) == greedy
    compressed.save_pretrained(tmp_path / "saved")
    assert tf.AutoConfig.from_pretrained(tmp_path / "saved").to_dict() == {
        **model.config.to_dict(), "_name_or_path": str(tmp_path / "saved"),
        "dtype": "float32"}  # the weights', as transformers writes it
    loaded = load(tmp_path / "saved")
    assert type(loaded.base_model) is type(model)
    torch.testing.assert_close(_outputs(loaded.base_model, ids), after, atol=0, rtol=0)
    for again in (loaded.base_model, load_onto_meta(tmp_path / "saved").base_model):
        assert all(t.is_meta for t in again.parameters()) == (again is not loaded.base_model)
        if tied:
            assert again.get_output_embeddings().embedding is again.get_input_embeddings()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_calibrated_compression_sees_every_matrixs_inputs_in_each_family(model_type):
    """SVD-LLM-style compression of every attention and FFN matrix: each is whitened by
    inputs it saw (fused, grouped-query, Conv1D and cross-attention matrices included),
    within its budget, with an output error (Eq. 7) below that of dropping it."""
    model = _build(model_type)
    names = _attention_ffn_names(model, model_type)
    ids = torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1:, 8:] = 0  # padding the calibration must leave out
    compressed = compress(model, targets=["attention", "ffn"], structure="svd", ratio=0.5,
                          calibration=[{"input_ids": ids, "attention_mask": mask}],
                          progress=False)
    report = list(compressed.report())
    assert {r["name"] for r in report} == names
    assert {r["calibration"] for r in report} == {"whitened"}
    assert all(r["ratio"] <= 0.5 + 1e-9 for r in report)
    assert all(0 < r["output_error"] < 1 for r in report)
    assert torch.isfinite(_outputs(compressed.base_model, ids)).all()


def test_gpt2_conv1d_layers_become_mpo_layers_in_the_right_orientation():
    model = _build("gpt2")
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D, weight 32 x 128 (in x out)
    weight = conv.weight.detach().clone()
    compressed = compress(model, targets=["h.0.mlp.c_fc"], n=3, progress=False)
    layer = compressed.base_model.transformer.h[0].mlp.c_fc
    assert (layer.in_features, layer.out_features) == (32, 128)
    torch.testing.assert_close(layer.weight, weight.T, atol=1e-6, rtol=0)
    assert compressed.report()[0]["shape"] == "32x128"


def test_an_unknown_architecture_lists_its_matrices_with_their_types():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(8, 8)
            self.spread = nn.Linear(8, 16)

    model = nn.Sequential(Block())
    with pytest.raises(ValueError, match=r"match no nn\.Linear, Conv1D or nn\.Embedding module\. "
                                         r"The presets \['attention', 'ffn'\] read matrix types "
                                         r"from module names, and architecture None is not in "
                                         r"mpotn's table .* \(2, with their types\): 0\.mix "
                                         r"\(mix\), 0\.spread \(spread\)"):
        compress(model, targets=["attention", "ffn"], progress=False)


@pytest.mark.parametrize("head", [
    tf.RobertaForSequenceClassification, tf.ElectraForSequenceClassification])
def test_a_task_head_is_never_an_attention_or_ffn_matrix(head):
    """RoBERTa's and ELECTRA's classifier names its last matrix ``out_proj``, the name of
    Llama's attention output: the presets, pruning and LoRA leave it to the head."""
    from mpotn.compression.config import CompressionConfig, select_targets
    from mpotn.finetune.pruning import GradualPruning
    from mpotn.finetune.strategies import lora_targets

    config = (tf.RobertaConfig(**ENCODER, max_position_embeddings=40) if "Roberta" in
              head.__name__ else tf.ElectraConfig(**ENCODER, embedding_size=16))
    model = head(config)
    assert matrix_type("classifier.out_proj") == matrix_type("classifier.dense") == "head"
    assert matrix_type("classification_head.out_proj") == "head"  # T5's and BART's
    assert matrix_type("encoder.block.1.layer.1.mlp.router.classifier") != "head"  # a router
    chosen = [n for n, _ in select_targets(model, CompressionConfig(targets=["attention",
                                                                              "ffn"]))]
    assert len(chosen) == 12 and not any("classifier" in n for n in chosen)
    assert not any("classifier" in n for n in lora_targets(model))
    assert not any("classifier" in n for n in GradualPruning(model, 0.5).modules)


@pytest.mark.parametrize(("model_type", "adapted"), [
    ("gpt2", {"c_attn", "c_proj", "c_fc"}),
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_lora_adapts_the_attention_and_ffn_linears_of_each_family(model_type, adapted):
    from mpotn.finetune.strategies import apply_strategy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes Conv1D's fan_in_fan_out
        wrapped = apply_strategy(_build(model_type), "lora", lora_rank=2)["model"]
    lora = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in wrapped.named_parameters()
            if ".lora_A." in n}
    assert lora == adapted


def _compress_quietly(model: nn.Module, **settings):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compressed = compress(model, n=3, progress=False, **settings)
    return compressed, [str(w.message) for w in caught]


def test_a_tied_head_reads_the_embedding_cores_through_training_and_counts_once():
    model = _build("gpt2")
    original = sum(p.numel() for p in model.parameters())  # wte counted once
    compressed, messages = _compress_quietly(model, targets=["embeddings"])
    assert messages == []
    base = compressed.base_model
    wte, head = base.transformer.wte, base.lm_head
    assert compressed.report()[0]["tied"] == "lm_head"
    assert compressed.totals()["compressed_matrices"] == 2  # wte and wpe; lm_head shares wte
    cores = sum(c.numel() for c in wte.cores) + sum(c.numel() for c in base.transformer.wpe.cores)
    assert compressed.totals()["total_params"] == original - 97 * 32 - 1024 * 32 + cores
    base.train()
    ids = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(base.parameters(), lr=0.1)
    base(input_ids=ids, labels=ids).loss.backward()
    assert all(c.grad is not None for c in wte.cores)
    optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(head.weight, wte.weight, atol=0, rtol=0)
        hidden = torch.randn(3, 32)
        torch.testing.assert_close(head(hidden), hidden @ wte.weight.T, atol=1e-5, rtol=1e-5)


def test_a_tied_head_without_its_embedding_or_with_another_method_is_skipped_with_a_reason():
    _, messages = _compress_quietly(_build("gpt2"), targets=["lm_head", "attention"])
    assert messages == ["skipping lm_head: its weight is tied to the embedding transformer.wte; "
                        "select transformer.wte (the 'embeddings' preset) to compress both, tied"]
    compressed, messages = _compress_quietly(_build("gpt2"), targets=["wte", "attention"],
                                             method="tucker")
    assert messages == ["skipping transformer.wte: its weight is tied to ['lm_head'], which only "
                        "method 'mpo' keeps tied; compress it with method 'mpo' or untie it"]
    assert "transformer.wte" not in {r["name"] for r in compressed.report()}


def test_t5_shares_one_embedding_layer_among_its_stacks_after_compress_and_load(tmp_path):
    compressed, _ = _compress_quietly(_build("t5"), targets=["shared"])
    assert compressed.report()[0]["tied"] == "encoder.embed_tokens,decoder.embed_tokens,lm_head"
    compressed.save_pretrained(tmp_path)
    for model in (compressed.base_model, load(tmp_path).base_model):
        assert model.encoder.embed_tokens is model.shared is model.decoder.embed_tokens
        assert model.lm_head.embedding is model.shared


def test_a_save_whose_tied_head_names_no_embedding_is_refused(tmp_path):
    import json

    compressed, _ = _compress_quietly(_build("gpt2"), targets=["embeddings"])
    compressed.save_pretrained(tmp_path)
    path = tmp_path / "mpotn_config.json"
    config = json.loads(path.read_text())
    config["layers"]["lm_head"]["tied_to"] = "transformer.h"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"invalid tied_to='transformer\.h'"):
        load(tmp_path)
    config["layers"]["lm_head"]["tied_to"] = "transformer.wpe"  # an embedding of another shape
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="edited after it was saved"):
        load(tmp_path)
    head = TiedMPOLinear("transformer.wpe", 32, 97)
    with pytest.raises(ValueError, match=r"needs an MPOEmbedding of 97 x 32 at 'transformer\.wpe', "
                                         r"got MPOEmbedding of 1024 x 32"):
        head.tie(compressed.base_model.transformer.wpe)
    with pytest.raises(RuntimeError, match=r"not tied to its embedding 'transformer\.wpe' yet"):
        head(torch.randn(1, 32))
