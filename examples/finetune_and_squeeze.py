"""Lightweight fine-tuning, then dimension squeezing, on the shipped SST-2 sample.

Run from the repository root::

    python examples/finetune_and_squeeze.py [--model DIR] [--out DIR] [--fast]

It decomposes the attention and FFN matrices of the embedded all-MiniLM-L6-v2
at full rank, trains only the auxiliary tensors (LFA) for one epoch, checks
that the central tensors did not move, then squeezes the central bonds
(Algorithm 2 with one-dimension cuts, 1.4% of the model's parameters per step)
for a few steps with auxiliary fine-tuning in between, and prints the
squeezing history and the matrices cut most. ``--fast`` trains on 64 examples for a few steps (the
test suite runs it that way, on a tiny model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpotn import Table
from mpotn.data import sst2_sample
from mpotn.finetune.squeeze import SqueezeConfig, squeeze
from mpotn.finetune.training import TrainingConfig, finetune, prepare_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: embedded MiniLM)")
    parser.add_argument("--out", type=Path, default=Path("example-squeeze"))
    parser.add_argument("--fast", action="store_true", help="a few steps on 64 examples")
    args = parser.parse_args(argv)

    data = sst2_sample()
    limits = {"train_limit": 64, "eval_limit": 64, "batch_size": 16} if args.fast else {}
    config = TrainingConfig(strategy="lfa", epochs=1, **limits)
    model, tokenizer = prepare_model(args.model, data, config)
    model.print_trainable_parameters()
    centrals = {name: layer.central.detach().clone()
                for name, layer in model.mpo_layers().items()}
    result = finetune(model, tokenizer, data, config)
    moved = max(float((layer.central - centrals[name]).abs().max())
                for name, layer in model.mpo_layers().items())
    print(f"LFA: accuracy {result.record['accuracy']:.4f}, trained "
          f"{result.record['trainable_params']:,} of {result.record['total_params']:,} "
          f"parameters; largest change of a central tensor: {moved}")

    settings = SqueezeConfig(cut=1, budget=0.002 if args.fast else 0.014,
                             training_steps=2 if args.fast else 40,
                             step_limit=3 if args.fast else 4,
                             delta=1.0 if args.fast else 0.05)  # 64 eval examples: noise
    squeezed = squeeze(model, tokenizer, data, settings, config, args.out)
    history = squeezed.history.select({
        "step": "step", "matrix": "matrices cut", "estimated_error": "largest est. error (Eq. 3)",
        "params_over_original": "params / original", "accuracy": "accuracy"})
    print(history.to_markdown())
    bonds = Table()
    for name, layer in squeezed.model.mpo_layers().items():
        bond = layer.mpo().central_bond
        bonds.append({"matrix": name, "central bond": layer.bond_dims[bond],
                      "full": layer.full_bond_dims[bond]})
    bonds.sort(key=lambda row: row["central bond"] / row["full"])
    print(Table(bonds[:5]).to_markdown())
    return {"lfa": result.record, "central_change": moved, "history": history, "bonds": bonds}


if __name__ == "__main__":
    main()
