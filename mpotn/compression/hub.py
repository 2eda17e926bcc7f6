"""Sharing a compressed model on the Hugging Face Hub.

[push_to_hub][mpotn.compression.hub.push_to_hub] writes a whole save
([save][mpotn.compression.serialization.save]) into a temporary folder, adds a model
card (``README.md``: ``library_name: mpotn``, the original model as ``base_model``
when it is a Hub id, the compression settings and totals, how to load it) unless the
repository already has one (a card there is the owner's and is kept, as transformers'
``push_to_hub`` keeps it), and uploads the folder in one commit, which also deletes an
earlier push's weights file (mpotn names weights by their digest,
``model-<12 hex>.safetensors``).
``mpotn.load("user/name")`` brings it back
([resolve_save][mpotn.compression.serialization.resolve_save]).

Examples
--------
>>> import torch
>>> from torch import nn
>>> from mpotn.compression import compress
>>> model = compress(nn.Sequential(nn.Linear(8, 8)), targets=["0"], n=2, progress=False)
>>> print(model_card(model, "me/tiny-mpo").splitlines()[1])
library_name: mpotn
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mpotn.compression.serialization import HUB_ID, is_hub_name, save

#: Remote files an upload may replace: the weights of earlier mpotn pushes (``model-`` and
#: 12 lowercase hex digits, as a save names them).
OLD_WEIGHTS = "model-" + "[0-9a-f]" * 12 + ".safetensors"


def _original_id(model: Any) -> str | None:
    """The Hub id the compressed model's original came from, when its config names one."""
    name = getattr(getattr(model.base_model, "config", None), "_name_or_path", None)
    if isinstance(name, str) and is_hub_name(name):
        return name
    return None


def model_card(model: Any, repo_id: str, base_model: str | None = None) -> str:
    """The ``README.md`` of a pushed model: Hub metadata, what was compressed, its size
    and how to load it.

    ``base_model`` (the original's Hub id) defaults to the one in the model's config.
    """
    base_model = base_model or _original_id(model)
    totals = model.totals()
    settings = model.compression_config.to_dict()
    meta = ["---", "library_name: mpotn", "tags:", "- mpotn", "- matrix-product-operator",
            "- tensor-network", "- model-compression"]
    if base_model:
        meta.append(f"base_model: {base_model}")
    meta.append("---")
    arch = type(model.base_model).__name__
    source = f" of [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    chosen = ", ".join(f"`{k}={settings[k]!r}`" for k in
                       ("targets", "structure", "ratio", "params", "budget", "keep_dense",
                        "sensitivity", "n")
                       if settings.get(k) not in (None, False))
    body = [
        f"# {repo_id.split('/')[-1]}", "",
        f"A {arch}{source} whose weight matrices are matrix product operators (MPO), "
        "compressed with mpotn (`pip install mpotn`).", "",
        "| | parameters |", "|---|---|",
        f"| total (#To) | {totals['total_params']:,} |",
        f"| original | {totals['original_params']:,} |",
        f"| #To / original | {totals['total_params'] / totals['original_params']:.4f} |",
        f"| MPO layers | {len(model.mpo_layers())} |", "",
        f"Compression settings: {chosen}." if chosen else "", "",
        "## Load", "", "```python", "import mpotn", "",
        f'model = mpotn.load("{repo_id}")  # weights and JSON only: no code runs', "```", "",
        "`model.merge()` gives the plain transformers model with dense matrices.", "",
    ]
    return "\n".join(meta + body)


def push_to_hub(model: Any, repo_id: str, *, tokenizer: Any | None = None,
                private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None,
                create_pr: bool = False, base_model: str | None = None) -> Any:
    """Upload a whole save of ``model`` (an
    [MPOModel][mpotn.compression.model.MPOModel]) and its model card to the Hub repository
    ``repo_id``, created if missing; a ``README.md`` already on ``revision`` is kept.

    Parameters
    ----------
    model:
        The compressed model.
    repo_id:
        ``"user/name"``.
    tokenizer:
        Saved beside the model when given.
    private:
        Create the repository as private (``None``: the Hub's default).
    token:
        A Hub token (default: the saved login).
    revision:
        The branch to push to, created from the main branch if missing (default: the
        main branch).
    commit_message:
        The commit's message.
    create_pr:
        Open a pull request instead of committing to ``revision``.
    base_model:
        The original model's Hub id for the card (default: read from its config).

    Returns
    -------
    huggingface_hub.CommitInfo
        The commit (``.commit_url``, ``.pr_url``).

    Raises
    ------
    ValueError
        If ``repo_id`` is not ``"user/name"``.
    """
    from huggingface_hub import HfApi

    if not HUB_ID.fullmatch(repo_id):
        raise ValueError(f"repo_id must be a Hub id such as 'user/minilm-mpo', got {repo_id!r}")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="mpotn-push-") as folder:
        save(model, folder, tokenizer=tokenizer)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not create_pr:  # upload_folder creates no branch
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if not api.file_exists(repo_id, "README.md", revision=revision):  # keep one there
            (Path(folder) / "README.md").write_text(model_card(model, repo_id, base_model),
                                                  encoding="utf-8")
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
            commit_message=commit_message or "Upload a model compressed with mpotn",
            delete_patterns=[OLD_WEIGHTS])
