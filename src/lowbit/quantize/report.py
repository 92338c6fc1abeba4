"""The per-layer account `lowbit.quantize` returns: bits, bytes and error of every swapped layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    format: str
    bits_per_parameter: float
    bytes_before: int
    bytes_after: int
    relative_error: float  # ‖W - Ŵ‖_F / ‖W‖_F
    # Share of outliers the method kept in high precision, when it keeps any: LLM.int8() input columns
    # with some |x| ≥ threshold on the calibration set, SpQR weights stored in fp16. None otherwise.
    outlier_share: float | None = None


@dataclass
class QuantReport:
    method: str
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def n_parameters(self) -> int:
        return sum(layer.shape[0] * layer.shape[1] for layer in self.layers)

    @property
    def bits_per_parameter(self) -> float:
        """Average storage bits over the quantized weights (scales and nested constants included)."""
        return 8 * self.bytes_after / max(self.n_parameters, 1)

    def to_markdown(self) -> str:
        outliers = any(r.outlier_share is not None for r in self.layers)  # the column only when a method reports it
        lines = ["| layer | shape | format | bits/param | bytes before | bytes after | rel. error |"
                 + (" outliers |" if outliers else ""),
                 "|---|---|---|---:|---:|---:|---:|" + ("---:|" if outliers else "")]  # fmt: skip
        for r in self.layers:
            share = "" if not outliers else " – |" if r.outlier_share is None else f" {100 * r.outlier_share:.2f}% |"
            lines.append(f"| {r.name} | {r.shape[0]}×{r.shape[1]} | {r.format} | {r.bits_per_parameter:.3f} | "
                         f"{r.bytes_before:,} | {r.bytes_after:,} | {r.relative_error:.4f} |{share}")  # fmt: skip
        return "\n".join(lines)

    def summary(self) -> str:
        if not self.layers:
            return f"{self.method}: no layer matched; nothing was quantized"
        worst = max(self.layers, key=lambda r: r.relative_error)
        return (f"{self.method}: {len(self.layers)} linear layers, {self.n_parameters:,} weights, "
                f"{self.bytes_before / 2**20:.1f} MiB → {self.bytes_after / 2**20:.1f} MiB "
                f"({self.bits_per_parameter:.3f} bits/param), worst relative error {worst.relative_error:.4f} "
                f"({worst.name}), {self.seconds:.1f} s")  # fmt: skip

    def __str__(self) -> str:
        return self.summary()
