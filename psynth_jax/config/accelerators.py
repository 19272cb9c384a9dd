"""Accelerator types as users name them, and what each chip offers (pure Python, no JAX).

    >>> parse_accelerator("v5litepod-16")
    Accelerator(chip=Chip(name='v5e', ...), chips=16)
    >>> parse_accelerator("v5p-64").chips       # Cloud TPU v5p names count TensorCores: 2 per chip
    32
    >>> parse_accelerator("8xh100").chips
    8

The launch scripts and `psynth plan` use it to check a config's mesh against the slice it will
run on, and its per-device memory against the chip's, before anything is provisioned. A Cloud
TPU slice also names its topology as libtpu spells it (`Accelerator.tpu_topology`), so that
`psynth plan` can compile for the slice's own TPU devices from a host without one:

    >>> parse_accelerator("v5litepod-256").tpu_topology
    TpuTopology(name='v5e:16x16', chip_config='default', host_bounds=(2, 2, 1))
"""

from __future__ import annotations

import dataclasses
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: its short name, what it is, and its memory (HBM) in bytes."""

    name: str
    description: str
    hbm_bytes: int
    cores_per_chip_in_name: int = 1  # Cloud TPU type names count TensorCores for v4 / v5p


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4 (32 GiB HBM)", 32 * GIB, cores_per_chip_in_name=2),
    "v5e": Chip("v5e", "TPU v5e / v5litepod (16 GiB HBM)", 16 * GIB),
    "v5p": Chip("v5p", "TPU v5p (95 GiB HBM)", 95 * GIB, cores_per_chip_in_name=2),
    "v6e": Chip("v6e", "TPU v6e Trillium (32 GiB HBM)", 32 * GIB),
    "h100": Chip("h100", "NVIDIA H100 SXM (80 GiB)", 80 * GIB),
    "h200": Chip("h200", "NVIDIA H200 (141 GB)", 141 * 10**9),
    "a100": Chip("a100", "NVIDIA A100 (80 GiB)", 80 * GIB),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6e": "v6e"}


# Chips -> the slice's shape (libtpu's topology names, as MaxText's accelerator map spells them):
# v5e / v6e slices are 2-D, v4 / v5p slices 3-D.
_TPU_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TPU_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
           512: "8x8x8", 1024: "8x8x16"}


@dataclasses.dataclass(frozen=True)
class TpuTopology:
    """A Cloud TPU slice as libtpu describes it (`jax.experimental.topologies.get_topology_desc`).

    name: "<generation>:<shape>" (v5e:16x16); chip_config: "megacore" for the chips whose two
    TensorCores act as one device (v4, v5p), else "default"; host_bounds: the chips one host
    drives, as a (x, y, z) box (a single-host v5e-8 is 2x4; multi-host slices 2x2 per host).
    """

    name: str
    chip_config: str
    host_bounds: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A slice or node: which chip, and how many of them."""

    chip: Chip
    chips: int

    @property
    def chips_per_host(self) -> int:
        """Chips one host (one JAX process) drives: a single-host slice or node all of them; a
        multi-host Cloud TPU slice 4 per host; a GPU node all of its GPUs."""
        if self.chip.name.startswith("v") and self.chips > 8:
            return 4
        if self.chip.name in ("v4", "v5p") and self.chips > 4:
            return 4
        return self.chips

    @property
    def is_tpu(self) -> bool:
        return self.chip.name.startswith("v")

    @property
    def tpu_topology(self) -> TpuTopology | None:
        """The slice's topology for libtpu; None for a GPU node or a chip count with no known shape."""
        if not self.is_tpu:
            return None
        if self.chip.cores_per_chip_in_name == 2:  # v4, v5p: megacore chips in a 3-D torus
            shape = _TPU_3D.get(self.chips)
            bounds = (2, 2, 1) if self.chips >= 4 else (self.chips, 1, 1)
            return TpuTopology(f"{self.chip.name}:{shape}", "megacore", bounds) if shape else None
        shape = _TPU_2D.get(self.chips)
        per_host = self.chips_per_host
        bounds = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}[per_host] if per_host in (1, 4, 8) else None
        return TpuTopology(f"{self.chip.name}:{shape}", "default", bounds) if shape and bounds else None

    def __str__(self) -> str:
        return f"{self.chips} x {self.chip.description}"


def parse_accelerator(text: str) -> Accelerator:
    """A Cloud TPU accelerator type (v5litepod-16, v5p-64, v4-32, v6e-8) or a GPU node (8xh100,
    h100x8, h200); ValueError listing the known forms otherwise."""
    s = text.strip().lower()
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5lite|v5e|v6e)-(\d+)", s)
    if m:
        chip = CHIPS[_ALIASES.get(m.group(1), m.group(1))]
        n = int(m.group(2))
        if n % chip.cores_per_chip_in_name:
            raise ValueError(f"accelerator {text!r}: {chip.name} type names count {chip.cores_per_chip_in_name} "
                             "cores per chip, so the number must be even")
        return Accelerator(chip, n // chip.cores_per_chip_in_name)
    m = re.fullmatch(r"(?:(\d+)x)?(h100|h200|a100)(?:x(\d+))?", s)
    if m and not (m.group(1) and m.group(3)):
        return Accelerator(CHIPS[m.group(2)], int(m.group(1) or m.group(3) or 1))
    raise ValueError(f"unknown accelerator {text!r}; use a Cloud TPU type (v5litepod-16, v5p-64, v4-32, v6e-8) "
                     f"or a GPU node (8xh100, h200); chips known: {', '.join(CHIPS)}")
