"""The compressed model: [MPOModel][mpotn.compression.model.MPOModel], and
[load][mpotn.compression.model.load] to read one back."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from mpotn.compression.adapters import is_adapter, read_adapter, save_adapter
from mpotn.compression.config import COMPRESSED_LAYERS, MPO_LAYERS, CompressionConfig
from mpotn.compression.hub import push_to_hub
from mpotn.compression.merge import merge
from mpotn.compression.parameters import count_parameters, lfa_parameters
from mpotn.compression.serialization import read, resolve_save, save
from mpotn.layers import MPOEmbedding, TiedMPOLinear
from mpotn.table import Table


class MPOModel(nn.Module):
    """A model whose selected matrices are MPO layers, with its report.

    Calls and unknown attributes go to the wrapped ``base_model``: ``model.config``
    is the Hugging Face model's config (``model.config.id2label``), ``generate``
    its ``generate``.

    Attributes
    ----------
    base_model:
        The compressed model (modified in place by [compress][mpotn.compression.compress.compress]).
    compression_config:
        The [CompressionConfig][mpotn.compression.config.CompressionConfig] used (mpotn's plan).
    records:
        Per-matrix report rows (see [report][mpotn.compression.model.MPOModel.report]).
    original_params:
        Parameters of the model before compression.
    source:
        The save (folder or Hub id) this model was loaded from, ``None`` for a model
        compressed here; an adapter save refers to it.

    Examples
    --------
    >>> import tempfile, torch
    >>> from mpotn.compression.compress import compress
    >>> _ = torch.manual_seed(0)
    >>> model = compress(nn.Sequential(nn.Linear(32, 64)), targets=["0"], n=3, ratio=0.5,
    ...                  progress=False)
    >>> model.totals()["compressed_matrices"], model.totals()["total_over_original"] < 0.6
    (1, True)
    >>> folder = tempfile.mkdtemp()
    >>> model.save_pretrained(folder)
    >>> again = load(folder, model=nn.Sequential(nn.Linear(32, 64)))
    >>> x = torch.randn(2, 32)
    >>> bool(torch.equal(again(x), model(x)))
    True
    """

    def __init__(
        self,
        base_model: nn.Module,
        compression_config: CompressionConfig,
        records: list[dict[str, Any]],
        original_params: int,
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.compression_config = compression_config
        self.records = Table(records)
        self.original_params = original_params
        self.source: str | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    #: Settings of the wrapped transformers model that, set on the wrapper, are set on it
    #: (``model.generation_config = ...`` reaches ``generate`` and the save); everything
    #: else (``forward`` patched by accelerate's hooks, ...) stays the wrapper's own.
    FORWARDED = frozenset({"config", "generation_config"})

    def __setattr__(self, name: str, value: Any) -> None:
        base = self.__dict__.get("_modules", {}).get("base_model")
        if name in self.FORWARDED and base is not None and hasattr(base, name):
            setattr(base, name, value)
        else:
            super().__setattr__(name, value)

    def num_parameters(self, only_trainable: bool = False,
                       exclude_embeddings: bool = False) -> int:
        """The parameters of the wrapped model (each shared tensor once), as transformers'
        ``num_parameters`` counts them; ``exclude_embeddings`` leaves out the embeddings'
        weights, compressed (their cores) or not.

        Examples
        --------
        >>> from torch import nn
        >>> from mpotn.compression.compress import compress
        >>> model = compress(nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 4)),
        ...                  targets=["embeddings"], n=2, progress=False)
        >>> cores = sum(core.numel() for core in model.base_model[0].cores)
        >>> model.num_parameters() - model.num_parameters(exclude_embeddings=True) == cores
        True
        """
        embeddings = {id(p) for m in self.base_model.modules()
                      if isinstance(m, (nn.Embedding, MPOEmbedding)) for p in m.parameters()
                      if exclude_embeddings}
        return count_parameters(p for p in self.base_model.parameters()
                                if (p.requires_grad or not only_trainable)
                                and id(p) not in embeddings)

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        """Refused, before any change, when the input or output embedding is compressed (an
        MPO has no rows to add); otherwise the wrapped model's.

        Raises
        ------
        ValueError
            Naming the compressed embedding, and ``merge()`` to resize the dense model.
        """
        getters = ("get_input_embeddings", "get_output_embeddings")
        compressed = [m for m in (getattr(self.base_model, g, lambda: None)() for g in getters)
                      if isinstance(m, COMPRESSED_LAYERS)]
        if compressed:
            raise ValueError(f"the model's {type(compressed[0]).__name__} embedding cannot "
                             "change its vocabulary; resize the dense model (merge(), then "
                             "resize_token_embeddings) and compress it again")
        return self.base_model.resize_token_embeddings(*args, **kwargs)

    def mpo_layers(self) -> dict[str, nn.Module]:
        """``{module name: MPOLinear or MPOEmbedding}``."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, MPO_LAYERS)}

    def compressed_layers(self) -> dict[str, nn.Module]:
        """Every replaced module: MPO layers, tied output layers and layers of other methods."""
        return {n: m for n, m in self.base_model.named_modules()
                if isinstance(m, COMPRESSED_LAYERS)}

    def report(self) -> Table:
        """Per matrix: name, shape, factorization, bonds, ratio, entropy, bound, error."""
        return self.records

    def totals(self) -> dict[str, Any]:
        """Parameter totals, the paper's #To and #Pr among them.

        * ``original_params``: the model before compression.
        * ``total_params`` (#To) and ``total_over_original``: every parameter
          of ``base_model`` now.
        * ``lfa_trainable_params`` (#Pr) and ``lfa_over_original``: what
          [lfa_parameters][mpotn.compression.parameters.lfa_parameters] selects with
          ``head=False`` -- the auxiliary tensors of every MPO layer, every bias and
          every normalization layer's parameters. A task head's weights are *not*
          counted (its bias is, as every bias): #Pr is a property of the compressed
          model, while ``apply_strategy(model, "lfa")``
          ([apply_strategy][mpotn.finetune.strategies.apply_strategy]) and
          [lfa_budget][mpotn.finetune.training.lfa_budget] count what a run trains,
          the new head included (``head=True``).
        * ``central_params`` / ``auxiliary_params``: summed over the MPO layers, a
          central tensor shared by several layers
          ([share_centrals][mpotn.compression.sharing.share_centrals]) once.
        * ``trainable_params``: parameters that require a gradient now.
        * ``compressed_matrices``: replaced modules, MPO and factorized layers (an
          output layer tied to a compressed embedding shares its matrix and is not
          counted again).
        """
        params = list(self.base_model.parameters())
        total = count_parameters(params)
        pr = count_parameters(p for _, p in lfa_parameters(self.base_model, head=False))
        mpo = list(self.mpo_layers().values())
        return {
            "original_params": self.original_params,
            "total_params": total,
            "total_over_original": total / self.original_params,
            "lfa_trainable_params": pr,
            "lfa_over_original": pr / self.original_params,
            "central_params": count_parameters({id(m.central): m.central
                                                for m in mpo}.values()),
            "auxiliary_params": sum(m.auxiliary_params for m in mpo),
            "trainable_params": count_parameters(p for p in params if p.requires_grad),
            "compressed_matrices": sum(not isinstance(m, TiedMPOLinear)
                                       for m in self.compressed_layers().values()),
        }

    def summary(self) -> str:
        """One line in the style of PEFT's ``print_trainable_parameters()``."""
        t = self.totals()
        return (
            f"trainable params: {t['trainable_params']:,} || all params (#To): "
            f"{t['total_params']:,} ({100 * t['total_over_original']:.2f}% of the original "
            f"{t['original_params']:,}) || aux-only fine-tuning updates (#Pr): "
            f"{t['lfa_trainable_params']:,} ({100 * t['lfa_over_original']:.2f}%)"
        )

    def print_trainable_parameters(self) -> None:
        """Print [summary][mpotn.compression.model.MPOModel.summary]."""
        print(self.summary())

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False,
                        tokenizer: Any | None = None, adapter_only: bool = False,
                        base: str | os.PathLike | None = None) -> None:
        """Save the model atomically, whole or as an adapter.

        Whole (the default): weights and plan, the Hugging Face ``config.json`` and,
        when given, the ``tokenizer``; see [mpotn.compression.serialization.save][].
        With ``adapter_only``: only the parameters that require a gradient (what
        LFA trains), referencing the compressed save ``base`` -- by default the one
        this model was loaded from ([source][mpotn.compression.model.MPOModel]); see
        [mpotn.compression.adapters.save_adapter][]. ``overwrite`` lets either write
        into a folder that holds files mpotn did not write.

        Raises
        ------
        ValueError
            With ``adapter_only``, when there is no base (the model was not loaded
            from a save and ``base`` is not given) or the model differs from it
            outside what it trains; and the errors of the two savers.
        """
        if not adapter_only:
            if base is not None:
                raise ValueError("base applies to adapter_only=True saves")
            save(self, directory, overwrite, tokenizer)
            return
        base = base if base is not None else self.source
        if base is None:
            raise ValueError(
                "adapter_only=True needs the compressed save this model was fine-tuned from, "
                "and this model was not loaded from one: save the compressed model "
                "(save_pretrained), load it with mpotn.load, fine-tune, then save the adapter "
                "-- or pass base=<that save>")
        save_adapter(self.base_model, directory, base, overwrite, tokenizer)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload a whole save and a model card to the Hugging Face Hub repository
        ``repo_id``; see [mpotn.compression.hub.push_to_hub][] for the keywords
        (``tokenizer``, ``private``, ``token``, ``revision``, ``commit_message``,
        ``create_pr``, ``base_model``). ``mpotn.load(repo_id)`` brings it back."""
        return push_to_hub(self, repo_id, **kwargs)

    def merge(self) -> nn.Module:
        """The dense model: every compressed layer of ``base_model`` replaced, in place, by
        the ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` of its weight (exact; ties kept),
        and ``base_model`` returned -- a plain transformers model for a Hugging Face base;
        see [mpotn.compression.merge.merge][]. Do not use this ``MPOModel`` afterwards."""
        return merge(self)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: nn.Module | None = None,
                        revision: str | None = None, base: str | os.PathLike | None = None,
                        device: str | torch.device | None = None) -> MPOModel:
        """Rebuild a compressed model from a save directory or a Hugging Face Hub id,
        without the original weights; or an adapter save on top of its ``base``.

        A ``directory`` that is not a folder here and looks like a Hub id
        (``"user/minilm-mpo"``) is fetched with ``huggingface_hub.snapshot_download``
        (``revision``: a branch, tag or commit), JSON, safetensors and tokenizer
        files only; the folder is then read as a local one. The other arguments and
        the errors are those of [mpotn.compression.serialization.read][], which
        rebuilds the module (``model`` is modified in place); this wraps it with its
        compression config and report. An adapter folder
        ([mpotn.compression.adapters][]) needs ``base``, the compressed save it was
        trained on (and ``model`` when that save needs one), and comes back frozen as it
        was trained. ``device`` (``"cuda"``,
        ``"cuda:1"``, ``"cpu"``) reads the weights straight onto that device.
        """
        folder = resolve_save(directory, revision)
        if is_adapter(folder):
            saved, source = read_adapter(folder, base, device, model), base
        else:
            if base is not None:
                raise ValueError(f"{directory} is a whole save, not an adapter; base applies "
                                 "to adapter saves")
            saved, source = read(folder, model, device), directory
        loaded = cls(saved.model, saved.config, saved.report, saved.original_params)
        loaded.source = str(source)
        return loaded


def load(directory: str | os.PathLike, model: nn.Module | None = None,
         revision: str | None = None, base: str | os.PathLike | None = None,
         device: str | torch.device | None = None) -> MPOModel:
    """Rebuild a compressed model from a save directory or Hub id (see
    [MPOModel.from_pretrained][mpotn.compression.model.MPOModel.from_pretrained]).

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from mpotn.compression.compress import compress
    >>> model = compress(nn.Sequential(nn.Linear(32, 64)), targets=["0"], n=3, progress=False)
    >>> folder = tempfile.mkdtemp()
    >>> model.save_pretrained(folder)
    >>> again = load(folder, model=nn.Sequential(nn.Linear(32, 64)))  # in eval mode
    >>> x = torch.randn(2, 32)
    >>> model = model.eval()
    >>> with torch.no_grad():
    ...     bool(torch.equal(again(x), model(x)))
    True
    """
    return MPOModel.from_pretrained(directory, model, revision, base, device)
