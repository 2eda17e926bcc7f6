"""Device names the user gives (``--device``, ``device=``): parsed, checked against the
devices that are here, and mpotn's default when none is given.

The user chooses where work runs; mpotn never forces the CPU. Left unset, a Trainer
picks its device itself ([mpotn.finetune.training.trainer_arguments][]) and work
outside a Trainer (compressing, calibrating, loading a save) takes
[resolve_device][mpotn.devices.resolve_device]'s default: CUDA when present, else the
CPU.
"""

from __future__ import annotations

import os

import torch


def _named(device: object, option: str, quote: bool = False) -> str:
    """How an error names the device: ``--device cuda`` (a command's option; quoted, when
    ``quote``, as ``--device 'cuda'``) or ``device='cuda'`` (a function's argument)."""
    if not option.startswith("--"):
        return f"{option}={device!r}"
    return f"{option} {device!r}" if quote else f"{option} {device}"


def parse_device(device: str | None, option: str = "--device") -> torch.device | None:
    """The device ``device`` names (``None`` stays ``None``), without asking whether it is here.

    ``option`` is how errors name it: a command's ``--device``, or ``device`` for a
    function's argument.

    Raises
    ------
    ValueError
        If ``device`` is not a device name, or names a device type mpotn does not run
        on (anything but ``cpu`` and ``cuda``; left at ``None`` the Trainer also finds
        MPS, XPU, ...).

    Examples
    --------
    >>> parse_device("cuda:1"), parse_device(None)
    (device(type='cuda', index=1), None)
    >>> parse_device("gpu")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --device 'gpu' is not a device name; pass cpu, cuda or cuda:N, or omit ...
    >>> parse_device("mps", option="device")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: device='mps': mpotn runs on cpu, cuda or cuda:N; pass one of them ...
    """
    if device is None:
        return None
    if not isinstance(device, str):
        raise ValueError(f"{option} must be a device name (cpu, cuda or cuda:N), got "
                         f"{device!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{_named(device, option, quote=True)} is not a device name; pass "
                         f"cpu, cuda or cuda:N, or omit {option} (CUDA when present, else the "
                         "CPU)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"{_named(device, option, quote=True)}: mpotn runs on cpu, cuda or "
                         "cuda:N; pass one of them (without a device, fine-tuning, squeezing "
                         f"and healing let the Trainer choose, which uses {parsed.type} when "
                         "present and CUDA is not)")
    return parsed


def check_device(device: str | None, option: str = "--device", trainer: bool = True
                 ) -> torch.device | None:
    """[parse_device][mpotn.devices.parse_device], then check the device is here.

    ``trainer``: the device is for a Trainer run, which may be one process of a
    distributed launch (``False`` for work that loads or compresses in one process).

    Returns
    -------
    torch.device or None
        The device, ``None`` for the Trainer's choice.

    Raises
    ------
    ValueError
        For a bad name; for ``cuda`` or ``cuda:N`` when no CUDA device is visible;
        for ``cuda:N`` beyond the visible devices; for a Trainer run, ``cuda:N`` in
        one process of a distributed launch (``WORLD_SIZE`` > 1: each process uses
        the GPU of its ``LOCAL_RANK``).

    Examples
    --------
    >>> check_device("cpu")
    device(type='cpu')
    """
    parsed = parse_device(device, option)
    if parsed is None or parsed.type == "cpu":
        return parsed
    named = _named(device, option)
    cpu = "--device cpu" if option.startswith("--") else f"{option}='cpu'"
    if not torch.cuda.is_available():
        raise ValueError(f"{named}: no CUDA device is visible "
                         f"(torch.cuda.is_available() is False); omit {option} or pass {cpu}")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"{named}: only {count} CUDA device(s) are visible "
                         f"(cuda:0 to cuda:{count - 1}); pass one of them, or cuda for all")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if trainer and parsed.index is not None and world > 1:
        raise ValueError(f"{named} pins one GPU, but this is one of {world} "
                         "processes of a distributed launch (accelerate launch, torchrun), "
                         f"where each process uses the GPU of its LOCAL_RANK; pass {option} "
                         f"cuda or omit {option}")
    return parsed


def resolve_device(device: str | None, option: str = "--device") -> torch.device:
    """[check_device][mpotn.devices.check_device] for work in one process (no Trainer),
    with ``None`` resolved to mpotn's default there (compressing, calibrating, checking
    fidelity, loading): CUDA when present, else the CPU.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    return (check_device(device, option, trainer=False)
            or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
