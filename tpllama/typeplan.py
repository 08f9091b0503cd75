"""Which runtime type each weight matrix gets, and why: decided once per WHOLE matrix.

`--weight-type auto` (the default) keeps each matrix in the type its file stores it in when
tpllama has native kernels for that type (wtypes.TYPES[...].native); a quantized type without
them becomes q80 (finer than any 4-6 bit type, so nothing is lowered), a float matrix
(F32/F16/BF16) becomes q80 too, and the load summary says so (`--weight-type f32` keeps its
values). `q40`, `q80`, `f32` force one type on every matrix; forcing a type no finer than the
file's is reported as lowering precision.

A matrix is quantized only when its full input width is a multiple of the runtime type's unit
(32) AND every column slice the plan may cut at ANY rank count starts on such a multiple: the
row-parallel wo is cut at head boundaries (head_dim), w2 at the plan's FFN unit. Otherwise it
runs in f32 at every rank count, so every rank count multiplies the same values.

Pure Python over the wtypes table and a reader's config, tensor names and file types
(it imports nothing compiled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .errors import TpllamaError
from .tensors import EMBEDDING, OUTPUT, layer_matrices
from .wtypes import BY_GGML, RUNTIME_TYPES, TYPES, WEIGHT_TYPE_CHOICES, WeightType

UNIT = 32            # the plan's FFN slice step: every quantized type's column unit (wtypes) divides it
FLOAT_FILE_TYPES = ("F32", "F16", "BF16")
FALLBACK = "q80"     # runtime type of quantized or float sources without native kernels
CONVERTIBLE = ("q40", "q80", "f32")   # types the loader can convert any matrix into (C quantizers)


def ffn_unit(config) -> int:
    """FFN units per slice step: the plan cuts w1/w3 rows and w2 columns at multiples of it."""
    return UNIT if config.hidden_dim % UNIT == 0 else 1


def column_layout(config, kind: str) -> Tuple[int, int, str]:
    """(full input width, step at which the plan may cut its columns, what sets that step)."""
    if kind == "wo":
        return config.n_heads * config.head_dim, config.head_dim, f"head size {config.head_dim}"
    if kind == "w2":
        return config.hidden_dim, ffn_unit(config), f"FFN width {config.hidden_dim}"
    return config.dim, config.dim, f"width {config.dim}"      # cut by rows only


def quantizable(config, kind: str, unit: int = UNIT) -> Optional[str]:
    """None when every slice of the matrix at every rank count is whole units; else why not."""
    width, step, what = column_layout(config, kind)
    if width % unit or step % unit:
        return f"{what} not a multiple of {unit}"
    return None


@dataclass(frozen=True)
class Choice:
    runtime: str     # tpllama runtime type ("q40", "q80", "f32", ...)
    file: str        # the file's GGML type ("Q4_1", "F16", ...)
    reason: str      # why, for the load summary
    by_width: bool = False   # f32 because its slices cannot be whole blocks

    def describe(self) -> str:
        own = BY_GGML.get(self.file)
        if own is not None and own.name == self.runtime:
            why = self.reason if self.by_width else "file's own"
            return f"{self.file} ({why})"
        return f"{self.file} -> {self.runtime} ({self.reason})"


def file_bits(ggml: str) -> float:
    """Bits per weight of a file type (types outside the table: from gguf's block sizes)."""
    t = BY_GGML.get(ggml)
    if t is not None:
        return t.bits
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[ggml]]
    return nbytes * 8 / block


def lowers(runtime: str, ggml: str) -> bool:
    """Converting a file type into `runtime` loses precision: a different type no finer."""
    own = BY_GGML.get(ggml)
    if own is not None and own.name == runtime:
        return False
    return TYPES[runtime].bits <= file_bits(ggml)


def choose(requested: str, ggml: str) -> Choice:
    """The runtime type of one matrix stored as `ggml` in the file, if its slices allow blocks."""
    if requested != "auto":
        own_type = BY_GGML.get(ggml)
        if requested not in CONVERTIBLE and (own_type is None or own_type.name != requested):
            raise TpllamaError(f"--weight-type {requested}: a {ggml} matrix cannot be converted to it; "
                               f"use auto or one of {', '.join(CONVERTIBLE)}")
        return Choice(requested, ggml, "--weight-type " + requested)
    if ggml in FLOAT_FILE_TYPES:     # q80 streams 4x fewer bytes than f32; the summary says it is lossy
        return Choice(FALLBACK, ggml, f"quantized from {ggml} for speed; --weight-type f32 keeps the file's values")
    own: Optional[WeightType] = BY_GGML.get(ggml)
    if own is not None and own.native:
        return Choice(own.name, ggml, "file's own")
    return Choice(FALLBACK, ggml, f"no native {ggml} kernels yet; {FALLBACK} is finer")


@dataclass(frozen=True)
class TypePlan:
    """The runtime type of every weight matrix of a model (tensor name -> Choice)."""
    requested: str
    choices: Dict[str, Choice]
    kinds: Dict[str, str]          # tensor name -> kind (wq ... w2, output)

    def runtime(self, name: str) -> str:
        return self.choices[name].runtime

    def summary(self) -> str:
        """One line: which runtime type each kind of matrix got and why."""
        per_kind: Dict[str, Tuple[str, ...]] = {}
        for name, kind in self.kinds.items():
            d = self.choices[name].describe()
            if d not in per_kind.get(kind, ()):
                per_kind[kind] = per_kind.get(kind, ()) + (d,)
        groups: Dict[Tuple[str, ...], list] = {}
        for kind, descs in per_kind.items():
            groups.setdefault(tuple(sorted(descs)), []).append(kind)
        return "weights: " + ", ".join(f"{'/'.join(kinds)} {' + '.join(descs)}" for descs, kinds in groups.items())

    def lowered(self) -> Optional[str]:
        """One line when a forced type lowers the precision of some matrix, else None."""
        if self.requested == "auto":
            return None
        hit = [(self.kinds[n], c.file) for n, c in self.choices.items() if lowers(c.runtime, c.file)]
        if not hit:
            return None
        files = sorted({f for _, f in hit})
        kinds = "/".join(dict.fromkeys(k for k, _ in hit))
        return (f"--weight-type {self.requested} lowers precision: the file stores {kinds} as "
                f"{'/'.join(files)}; the default (auto) never goes below them")


def check_requested(requested: str):
    if requested not in WEIGHT_TYPE_CHOICES:
        raise TpllamaError(f"--weight-type {requested!r}: expected one of {', '.join(WEIGHT_TYPE_CHOICES)}")


def tensor_kinds(config, output_name: str) -> Dict[str, str]:
    """Every weight matrix's tensor name -> its kind, in model order."""
    kinds = {}
    for i in range(config.n_layers):
        kinds.update(layer_matrices(config, i))     # a mixture of experts: each expert's w1, w3, w2
    kinds[output_name] = "output"
    return kinds


def output_tensor_name(reader) -> str:
    """The output matrix: its own tensor, or the token embedding when tied or absent."""
    tied = reader.config.tie_embeddings or not reader.has(OUTPUT)
    return EMBEDDING if tied else OUTPUT


def choose_types(reader, requested: str = "auto") -> TypePlan:
    """The TypePlan of a model file (reader: config, has(name), dtype(name) -> GGML type name)."""
    check_requested(requested)
    c = reader.config
    kinds = tensor_kinds(c, output_tensor_name(reader))
    choices = {}
    for name, kind in kinds.items():
        choice = choose(requested, reader.dtype(name))
        if TYPES[choice.runtime].quantized:
            problem = quantizable(c, kind, TYPES[choice.runtime].unit)
            if problem:
                choice = Choice("f32", choice.file, problem, by_width=True)
        choices[name] = choice
    return TypePlan(requested, choices, kinds)


class _UniformFile:
    """A stand-in for a file storing every matrix as one type (plans without a file)."""

    def __init__(self, config, ggml: str):
        self.config, self._ggml = config, ggml

    def has(self, name: str) -> bool:
        return not self.config.tie_embeddings

    def dtype(self, name: str) -> str:
        return self._ggml


def uniform_types(config, wtype: str) -> TypePlan:
    """Every matrix in `wtype` where its widths allow (as if the file stored it so)."""
    if wtype not in RUNTIME_TYPES:
        raise TpllamaError(f"weight type {wtype!r}: expected one of {', '.join(RUNTIME_TYPES)}")
    return choose_types(_UniformFile(config, TYPES[wtype].ggml), wtype)



def type_table() -> str:
    """The per-type table of docs/formats.md (Markdown), from the wtypes table:
    `python -m tpllama.typeplan` prints it."""
    lines = ["| file type | bits per weight | `--weight-type auto` runs it as | why |", "|---|---|---|---|"]
    for t in TYPES.values():
        c = choose("auto", t.ggml)
        runs = "its own blocks (" + c.runtime + ")" if c.reason == "file's own" else c.runtime
        why = {"file's own": "native kernels: the file's values, untouched"}.get(c.reason, c.reason)
        lines.append(f"| {t.ggml} | {t.bits:g} | {runs} | {why} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(type_table())
