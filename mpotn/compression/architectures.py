"""What each weight matrix of a transformer is, by architecture family.

One table, [MATRIX_TYPES][mpotn.compression.architectures.MATRIX_TYPES], maps
module names to short matrix types (``query``, ``qkv``, ``attn_out``,
``ffn_gate``, ``ffn_in``, ``ffn_out``, ``word_emb``, ``lm_head``, ...) for
every family mpotn knows; the presets ``attention`` and ``ffn`` of
[mpotn.compression.config][] select by these types, so they mean the same
matrices on BERT (``query``, ``intermediate.dense``), GPT-2 (``c_attn``,
``c_fc``), Llama (``q_proj``, ``gate_proj``) and T5 (``SelfAttention.q``,
``DenseReluDense.wi``). [ARCHITECTURES][mpotn.compression.architectures.ARCHITECTURES]
lists the ``config.model_type`` values each family covers.

GPT-2-style models store their matrices in ``transformers``' ``Conv1D``
(weight ``in x out``, ``y = x W + b``) rather than ``nn.Linear`` (weight
``out x in``); [as_linear][mpotn.compression.architectures.as_linear] turns one
into the equal ``nn.Linear``.

Examples
--------
>>> matrix_type("transformer.h.0.attn.c_proj"), matrix_type("transformer.h.0.mlp.c_proj")
('attn_out', 'ffn_out')
>>> matrix_type("model.layers.3.mlp.gate_proj"), layer_index("model.layers.3.mlp.gate_proj")
('ffn_gate', 3)
"""

from __future__ import annotations

import re
import sys

import torch
from torch import nn

#: Module-name rules per family, searched in this order (first match wins): a
#: family's specific names come before the shared ones they would also match
#: (MobileBERT's ``bottleneck.attention.dense`` before BERT's ``attention.dense``).
#: A name no rule matches is typed by its last component.
MATRIX_TYPES: dict[str, tuple[tuple[str, str], ...]] = {
    "mobilebert": (
        (r"bottleneck\.(input|attention)\.dense$", "bottleneck_in"),
        (r"output\.bottleneck\.dense$", "bottleneck_out"),
        (r"embeddings\.embedding_transformation$", "emb_proj"),
    ),
    "bert": (  # also RoBERTa, ELECTRA, ALBERT, DistilBERT
        (r"word_embeddings$", "word_emb"),
        (r"position_embeddings$", "position_emb"),
        (r"token_type_embeddings$", "token_type_emb"),
        (r"(embedding_hidden_mapping_in|embeddings_project)$", "emb_proj"),
        (r"(^|\.)(query|q_lin)$", "query"),
        (r"(^|\.)(key|k_lin)$", "key"),
        (r"(^|\.)(value|v_lin)$", "value"),
        (r"(attention\.output\.dense|attention\.dense|out_lin)$", "attn_out"),
        (r"(intermediate\.dense|ffn\.lin1|\.ffn)$", "ffn_in"),
        (r"(output\.dense|ffn\.lin2|ffn_output)$", "ffn_out"),
        (r"pooler(\.dense)?$", "pooler"),
    ),
    "gpt2": (
        (r"\bwte$", "word_emb"),
        (r"\bwpe$", "position_emb"),
        (r"attn\.c_attn$", "qkv"),
        (r"attn\.c_proj$", "attn_out"),
        (r"mlp\.c_fc$", "ffn_in"),
        (r"mlp\.c_proj$", "ffn_out"),
    ),
    "gpt_neox": (  # also Falcon and BLOOM
        (r"embed_in$", "word_emb"),
        (r"embed_out$", "lm_head"),
        (r"query_key_value$", "qkv"),
        (r"self_attention\.dense$", "attn_out"),
        (r"dense_h_to_4h$", "ffn_in"),
        (r"dense_4h_to_h$", "ffn_out"),
    ),
    "llama": (  # also Mistral, Qwen2, Gemma, Phi, Phi-3, GPT-J, Mixtral
        (r"embed_tokens$", "word_emb"),
        (r"q_proj$", "query"),
        (r"k_proj$", "key"),
        (r"v_proj$", "value"),
        (r"qkv_proj$", "qkv"),
        (r"(o_proj|out_proj|self_attn\.dense)$", "attn_out"),
        (r"(gate_proj|experts\.\d+\.w1)$", "ffn_gate"),
        (r"(up_proj|gate_up_proj|fc_in|fc1|experts\.\d+\.w3)$", "ffn_in"),
        (r"(down_proj|fc_out|fc2|experts\.\d+\.w2)$", "ffn_out"),
        (r"block_sparse_moe\.gate$", "router"),
    ),
    "t5": (
        (r"^shared$", "word_emb"),
        (r"relative_attention_bias$", "position_bias"),
        (r"(SelfAttention|EncDecAttention)\.q$", "query"),
        (r"(SelfAttention|EncDecAttention)\.k$", "key"),
        (r"(SelfAttention|EncDecAttention)\.v$", "value"),
        (r"(SelfAttention|EncDecAttention)\.o$", "attn_out"),
        (r"DenseReluDense\.wi_0$", "ffn_gate"),
        (r"DenseReluDense\.wi(_1)?$", "ffn_in"),
        (r"DenseReluDense\.wo$", "ffn_out"),
    ),
    "heads": (
        (r"lm_head$", "lm_head"),
    ),
}

#: Module names of cross-attention key and value projections (T5, BART-style
#: ``encoder_attn``, BERT decoders' ``crossattention``): their inputs are the encoder's
#: tokens although they sit in the decoder.
CROSS_ATTENTION_INPUT = re.compile(
    r"(EncDecAttention\.[kv]|encoder_attn\.[kv]_proj|crossattention\.self\.(key|value))$")

#: ``config.model_type`` values whose module names the table covers, by family.
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "bert": ("bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "distilbert",
             "mobilebert"),
    "gpt2": ("gpt2",),
    "gpt_neox": ("gpt_neox", "falcon", "bloom"),
    "llama": ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi",
              "phi3", "gptj"),
    "t5": ("t5", "mt5"),
}

_RULES = [(re.compile(pattern), short) for rules in MATRIX_TYPES.values()
          for pattern, short in rules]
#: An expert's part of a module name (``upcycle_experts``): ``.experts.<e>``.
_EXPERT = re.compile(r"\.experts\.\d+(?=\.)")
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


#: Module-name components that mark a task head outside the layer stack (trained by every
#: strategy, never an ``attention`` or ``ffn`` matrix, whatever its own name: RoBERTa's
#: ``classifier.out_proj``, T5's and BART's ``classification_head.out_proj``).
HEAD_NAMES = ("classifier", "pre_classifier", "score", "qa_outputs", "classification_head")


def head_part(name: str) -> str | None:
    """The component of a module or parameter name that makes it part of a task head
    ([HEAD_NAMES][mpotn.compression.architectures.HEAD_NAMES], outside the layers: a
    mixture's ``router.classifier`` inside a layer is not one), or ``None``.

    Examples
    --------
    >>> head_part("classifier.out_proj"), head_part("classification_head.dense.weight")
    ('classifier', 'classification_head')
    >>> head_part("encoder.block.1.layer.1.mlp.router.classifier") is None
    True
    """
    if layer_index(name) is not None:
        return None
    return next((part for part in name.split(".") if part in HEAD_NAMES), None)


def matrix_type(name: str) -> str:
    """Short type of a module name: ``head`` inside a task head
    ([head_part][mpotn.compression.architectures.head_part]), else the first rule of
    [MATRIX_TYPES][mpotn.compression.architectures.MATRIX_TYPES] it matches.

    Examples
    --------
    >>> matrix_type("encoder.layer.3.attention.self.query")
    'query'
    >>> matrix_type("encoder.layer.3.output.dense")
    'ffn_out'
    >>> matrix_type("encoder.block.0.layer.1.DenseReluDense.wi_0")
    'ffn_gate'
    >>> matrix_type("some.custom.proj")
    'proj'
    >>> matrix_type("encoder.layer.3.output.dense.layer")  # inside an adapter's wrapper
    'ffn_out'
    >>> matrix_type("transformer.h.0.mlp.experts.2.c_proj")  # an upcycled expert's
    'ffn_out'
    >>> matrix_type("classifier.out_proj")  # RoBERTa's head, not an attention output
    'head'
    """
    if head_part(name) is not None:
        return "head"
    name = name.removesuffix(".layer")  # a matrix inside a bottleneck adapter's wrapper
    for candidate in (name, _EXPERT.sub("", name)):  # then as if not an upcycled expert
        for pattern, short in _RULES:
            if pattern.search(candidate):
                return short
    return name.rsplit(".", 1)[-1]


def in_expert(name: str) -> bool:
    """Whether a module name lies inside an expert of a mixture (``...experts.<e>...``:
    mpotn's upcycled experts, Mixtral's and Qwen2-MoE's routed ones), which sees only the
    tokens routed to it.

    Examples
    --------
    >>> in_expert("model.layers.0.mlp.experts.3.gate_proj")
    True
    >>> in_expert("model.layers.0.mlp.shared_expert.gate_proj")
    False
    """
    return _EXPERT.search(name) is not None


def compressed_names(name: str) -> tuple[str, ...]:
    """The names a matrix may have had when it was compressed (its row in the compression
    report), for its module name now: inside a bottleneck adapter's wrapper
    (``....layer``) or an upcycled expert (``<block>.experts.<e>.<part>``: the matrix was
    ``<block>.<part>``, or ``<parent of block>.<part>`` when the expert holds the block's
    neighbours too, as BERT's ``intermediate`` and ``output``).

    Examples
    --------
    >>> compressed_names("encoder.layer.3.output.dense.layer")
    ('encoder.layer.3.output.dense',)
    >>> compressed_names("transformer.h.0.mlp.experts.2.c_proj")
    ('transformer.h.0.mlp.c_proj', 'transformer.h.0.c_proj')
    >>> compressed_names("encoder.layer.0.intermediate.experts.1.output.dense")[1]
    'encoder.layer.0.output.dense'
    """
    name = name.removesuffix(".layer")
    match = _EXPERT.search(name)
    if match is None:
        return (name,)
    block, part = name[:match.start()], name[match.end() + 1:]
    return (f"{block}.{part}", f"{block.rpartition('.')[0]}.{part}".lstrip("."))


def layer_index(name: str) -> int | None:
    """Layer number in a module name, if any.

    Examples
    --------
    >>> layer_index("encoder.layer.11.output.dense"), layer_index("pooler.dense")
    (11, None)
    """
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_pattern(name: str) -> str:
    """``name`` with its layer number (the one
    [layer_index][mpotn.compression.architectures.layer_index] reads) and its expert
    number replaced by ``*``: one name for the same matrix of every layer of one stack,
    and of every expert of its mixtures.

    Examples
    --------
    >>> layer_pattern("decoder.block.3.layer.1.EncDecAttention.q")
    'decoder.block.*.layer.1.EncDecAttention.q'
    >>> layer_pattern("transformer.h.0.mlp.experts.2.c_fc")
    'transformer.h.*.mlp.experts.*.c_fc'
    """
    name = _LAYER.sub(lambda m: m.group(0).replace(m.group(1), "*"), name, count=1)
    return _EXPERT.sub(".experts.*", name)


#: Names of the modules that are a whole feed-forward block (input matrices,
#: activation, output matrix; ``(..., hidden) -> (..., hidden)``): GPT-2's, Llama's and
#: GPT-NeoX's ``mlp``, T5's ``DenseReluDense``, DistilBERT's ``ffn``.
FEED_FORWARD_NAMES = ("mlp", "DenseReluDense", "ffn")


def feed_forward_blocks(model: nn.Module) -> list[tuple[str, str | None]]:
    """The feed-forward block of every numbered layer, as ``(block, output)`` names.

    A whole block (a module named as in
    [FEED_FORWARD_NAMES][mpotn.compression.architectures.FEED_FORWARD_NAMES] that holds
    two or more matrices) gives ``(name, None)``. BERT-style layers split the block:
    ``intermediate`` holds the input matrix and the activation, ``output.dense`` the
    output matrix (``output`` then adds the residual and normalises); they give
    ``("<layer>.intermediate", "<layer>.output.dense")``.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2,
    ...                             num_attention_heads=2, intermediate_size=16))
    >>> feed_forward_blocks(bert)[0]
    ('encoder.layer.0.intermediate', 'encoder.layer.0.output.dense')
    """
    blocks = []
    for name, module in model.named_modules():
        if layer_index(name) is None:
            continue
        children = dict(module.named_children())
        intermediate, output = children.get("intermediate"), children.get("output")
        if (intermediate is not None and output is not None
                and hasattr(intermediate, "dense") and hasattr(output, "dense")):
            blocks.append((f"{name}.intermediate", f"{name}.output.dense"))
        elif (name.rsplit(".", 1)[-1] in FEED_FORWARD_NAMES and not is_linear(module)
              and sum(is_linear(m) or hasattr(m, "cores") for m in module.modules()) >= 2):
            blocks.append((name, None))
    return blocks


def known_architecture(model: nn.Module) -> bool:
    """Whether the table covers ``model``'s ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return any(model_type in types for types in ARCHITECTURES.values())


def conv1d_class() -> type | None:
    """``transformers``' ``Conv1D`` when transformers is imported (no model can hold one
    otherwise), else ``None``; importing nothing keeps ``mpotn --help`` fast."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` ``Conv1D`` (GPT-2's linear layers)."""
    conv1d = conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or ``Conv1D``: a layer ``y = x W + b`` mpotn can compress."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def overrides_forward(module: nn.Module) -> bool:
    """Whether ``module`` is a subclass of ``nn.Linear`` / ``nn.Embedding`` that changes its
    forward pass (Gemma's ``GemmaTextScaledWordEmbedding`` scales its output, a quantized
    linear dequantizes): an MPO layer of its weight would not compute what it does.

    Examples
    --------
    >>> class Scaled(nn.Embedding):
    ...     def forward(self, ids):
    ...         return 2 * super().forward(ids)
    >>> overrides_forward(Scaled(4, 2)), overrides_forward(nn.Embedding(4, 2))
    (True, False)
    """
    for base in (nn.Linear, nn.Embedding):
        if isinstance(module, base):
            return type(module).forward is not base.forward
    return False


def linear_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer in the paper's ``in x out`` orientation (a view)."""
    weight = module.weight.detach()
    return weight if is_conv1d(module) else weight.T


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear`` that computes the same outputs: itself when it is
    one; for a ``Conv1D`` (weight ``in x out``) a new layer with the transposed weight,
    on the same device and dtype.

    Examples
    --------
    >>> from transformers.pytorch_utils import Conv1D
    >>> conv = Conv1D(6, 4)  # 4 inputs, 6 outputs
    >>> x = torch.randn(3, 4)
    >>> bool(torch.allclose(as_linear(conv)(x), conv(x)))
    True
    """
    if isinstance(module, nn.Linear):
        return module
    if not is_conv1d(module):
        raise ValueError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")
    weight = module.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.train(module.training)
    return linear
