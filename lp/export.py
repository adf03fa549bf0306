"""GGUF out: a model loaded from a GGUF file and pruned to a plain stack, written as a GGUF file for llama.cpp.

The kept layers' tensors are copied byte for byte in their original quantisation (no de-quantise / re-quantise
round trip), renumbered ``blk.<new>.*``; ``<arch>.block_count`` and every per-layer metadata array (a
numeric array of block_count entries, as some architectures keep head counts or window sizes per layer) are cut
to the kept layers; everything else (tokenizer, chat template, general.*) is copied as it is. The copy follows
gguf's own ``gguf_new_metadata.py`` (fields, then tensor infos, then the data).

Only a plain stack can be written so: a patch is an operation llama.cpp does not have, and a patch folded into
the weights (prunecomp, replaceme) or trained weights (distill.train) change tensors that would then need
re-quantising; width pruning (prune=llm_pruner) gives layers their own widths. :func:`gguf_problem` says which.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .files import atomic_write

BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
MARK = "lp.pruned"  # the metadata key of a file lp wrote: its source file and the layers removed (JSON)


def gguf_problem(cfg: dict, narrows: bool) -> str | None:
    """Why ``save_gguf`` cannot write this run's model (``narrows``: its metric prunes width), or None; read
    from the config alone, so it is said before the weights load."""
    variant, dist = cfg["patch"]["variant"], cfg["distill"]["method"]
    if not cfg["model"].get("gguf_file"):
        return "it copies the kept layers out of the model's own GGUF file, and model.gguf_file is null: use save_model=DIR"
    if variant != "none":
        return (f"patch={variant} adds to the kept layers (a patch llama.cpp has no operation for, a map folded into "
                f"weights or a trained layer, which would need re-quantising): use patch=none, or save_model=DIR")
    if dist != "none":
        return f"distill={dist} trains weights, which would then need re-quantising: use distill=none, or save_model=DIR"
    if narrows:
        return f"prune.metric={cfg['prune']['metric']} gives each layer its own widths: use save_model=DIR"
    return foreign_file(cfg["save_gguf"])


def layer_kind_problem(kinds: list | None, removed: list[int]) -> str | None:
    """Why the pruned file would compute another model than lp's pruned one, or None: where layers of several
    kinds alternate (Gemma 3's sliding-window and full attention), GGUF readers (transformers, llama.cpp) give
    each layer its kind by its position, so the kept layers must keep their kinds at their new positions."""
    if not kinds or len(set(kinds)) == 1:
        return None
    kept = [k for i, k in enumerate(kinds) if i not in set(removed)]
    moved = [i for i, (k, want) in enumerate(zip(kept, kinds)) if k != want]
    if not moved:
        return None
    return (f"its readers set each layer's kind ({', '.join(sorted(set(kinds)))}) by position, and without layers "
            f"{sorted(removed)} the kept layers at new positions {moved} would change kind: the file would compute "
            f"another model; save_model=DIR keeps each layer's kind")


def foreign_file(out: str | Path) -> str | None:
    """Why save_gguf=``out`` may not be written (a file lp did not write, or a folder where the file goes), or None."""
    out = Path(out).expanduser()
    if out.is_dir():
        return "a folder is there: give the path of a .gguf file"
    if out.exists() and not _written_by_lp(out):
        return f"a file lp did not write is there (no {MARK} key); lp replaces only a GGUF file it wrote itself: give a new path"
    return None


def _written_by_lp(path: Path) -> bool:
    import gguf

    try:
        return MARK in gguf.GGUFReader(path).fields
    except Exception:  # not a GGUF file, or a damaged one: not lp's to replace
        return False


def prune_gguf(source: str | Path, out: str | Path, removed: list[int], kinds: list | None = None) -> Path:
    """Write ``source`` without the decoder layers ``removed`` to ``out`` (beside it first, then renamed into
    place: an interrupted write leaves no half file under that name). ``kinds``: the dense model's layer types
    (config.layer_types), refused where removing layers would change a kept layer's kind."""
    import gguf

    source, out = Path(source), Path(out)
    why = layer_kind_problem(kinds, removed)
    if why:
        raise ValueError(f"save_gguf={out}: {why}")
    if why := foreign_file(out):
        raise FileExistsError(f"save_gguf={out}: {why}")
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    count_key = f"{arch}.block_count"
    L = int(reader.fields[count_key].contents())
    bad = [i for i in removed if not 0 <= i < L]
    if bad or len(set(removed)) != len(removed):
        raise ValueError(f"layers to remove {removed} must be distinct indices in [0, {L - 1}] of {source}")
    kept = [i for i in range(L) if i not in set(removed)]
    new_index = {old: new for new, old in enumerate(kept)}

    def write(tmp: Path) -> None:  # into a temporary beside ``out``, renamed into place when whole (atomic_write)
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by the writer itself
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if field.name == count_key:
                value = len(kept)
            elif (sub is not None and sub != gguf.GGUFValueType.STRING and field.name.startswith(f"{arch}.")
                  and len(value) == L):
                value = [value[i] for i in kept]  # a per-layer array
            writer.add_key_value(field.name, value, kind, sub_type=sub)
        writer.add_key_value(MARK, json.dumps({"source": source.name, "removed": sorted(removed)}),
                             gguf.GGUFValueType.STRING)
        tensors = []
        for t in reader.tensors:
            m = BLOCK.fullmatch(t.name)
            if m and int(m[1]) not in new_index:
                continue
            tensors.append((f"blk.{new_index[int(m[1])]}.{m[2]}" if m else t.name, t))
        for name, t in tensors:
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, t in tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()

    atomic_write(out, write)
    return out
