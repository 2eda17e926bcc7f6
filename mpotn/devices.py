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


def parse_device(device: str | None) -> torch.device | None:
    """The device ``device`` names (``None`` stays ``None``), without asking whether it is here.

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
    """
    if device is None:
        return None
    if not isinstance(device, str):
        raise ValueError(f"--device must be a device name (cpu, cuda or cuda:N), got "
                         f"{device!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device name; pass cpu, cuda or cuda:N, "
                         "or omit --device (CUDA when present, else the CPU)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: mpotn runs on cpu, cuda or cuda:N; omit "
                         f"--device to let the Trainer choose (it uses {parsed.type} when "
                         "present and CUDA is not)")
    return parsed


def check_device(device: str | None) -> torch.device | None:
    """[parse_device][mpotn.devices.parse_device], then check the device is here.

    Returns
    -------
    torch.device or None
        The device, ``None`` for the Trainer's choice.

    Raises
    ------
    ValueError
        For a bad name; for ``cuda`` or ``cuda:N`` when no CUDA device is visible;
        for ``cuda:N`` beyond the visible devices; for ``cuda:N`` in one process of a
        distributed launch (``WORLD_SIZE`` > 1: each process uses its own GPU).

    Examples
    --------
    >>> check_device("cpu")
    device(type='cpu')
    """
    parsed = parse_device(device)
    if parsed is None or parsed.type == "cpu":
        return parsed
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible "
                         "(torch.cuda.is_available() is False); omit --device or pass "
                         "--device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"--device {device}: only {count} CUDA device(s) are visible "
                         f"(cuda:0 to cuda:{count - 1}); pass one of them, or cuda for all")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if parsed.index is not None and world > 1:
        raise ValueError(f"--device {device} pins one GPU, but this is one of {world} "
                         "processes of a distributed launch (accelerate launch, torchrun), "
                         "where each process uses the GPU of its LOCAL_RANK; pass --device "
                         "cuda or omit --device")
    return parsed


def resolve_device(device: str | None) -> torch.device:
    """[check_device][mpotn.devices.check_device], with ``None`` resolved to
    mpotn's default outside a Trainer (compressing, calibrating, checking fidelity):
    CUDA when present, else the CPU.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    return check_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
