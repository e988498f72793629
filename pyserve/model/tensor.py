"""TensorRecord: one weight tensor handed to the C++ engine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# numpy dtype that holds each format's bytes (bf16 has no numpy dtype: its bits ride in uint16).
FORMAT_DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(np.uint16),
}


@dataclass
class TensorRecord:
    format: str  # "f32" | "f16" | "bf16", or a GGUF block type ("q4_1", "q6_k", ...): uint8 rows of blocks
    data: np.ndarray  # C-contiguous buffer with exactly the tensor's bytes (memmap view where possible)
    shape: tuple[int, ...]  # logical row-major (PyTorch) shape, e.g. (out_features, in_features)

    def __post_init__(self) -> None:
        # Float formats are checked here; packed formats added later carry their own block layout.
        expected = FORMAT_DTYPES.get(self.format)
        if expected is None:
            return
        if self.data.dtype != expected:
            raise ValueError(f"format {self.format} needs dtype {expected}, got {self.data.dtype}")
        if tuple(self.data.shape) != tuple(self.shape):
            raise ValueError(f"data shape {self.data.shape} does not match logical shape {self.shape}")
        if not self.data.flags.c_contiguous:
            raise ValueError("tensor data must be C-contiguous")

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def to_float32(self) -> np.ndarray:
        """A float32 copy (bf16 widened by shifting its bits into the high half of a float32; GGUF
        blocks dequantized by the gguf package, for tests and tools: the engine reads blocks itself)."""
        if self.format == "bf16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        if self.format not in FORMAT_DTYPES:
            import gguf

            qtype = gguf.GGMLQuantizationType[self.format.upper()]
            return gguf.quants.dequantize(self.data, qtype).reshape(self.shape).astype(np.float32)
        return self.data.astype(np.float32)
