"""The text summary of a store that ``info`` prints (and ``ingest``, ``synth``, ``run`` and
``demo`` print after writing one)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["describe"]


def describe(path: str | Path) -> str:
    """Shape, dtype, chunks, slots and recorded stages of the store at ``path`` (each modality
    of a MuData store). Reads metadata only, plus ``X/indptr``'s last value."""
    import zarr

    from ..store import open_atlas

    open_atlas(path)  # a clear error if this is not an atlas
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)  # slots change after writing
    mods = sorted(root["mod"].group_keys()) if root.attrs.get("encoding-type") == "MuData" else [None]
    lines = [f"store: {Path(path).absolute()} (zarr v{root.metadata.zarr_format})"]
    for mod in mods:
        a = open_atlas(path, mod=mod)
        g = root[a.group_path] if a.group_path else root
        head = f"[{mod}] " if mod else ""
        blocks = a.X.numblocks[0]
        lines.append(f"{head}X: {a.n_obs} cells x {a.n_vars} features, nnz {a.nnz} "
                     f"({a.nnz / max(a.n_obs, 1):.0f} per cell), dtype {g['X']['data'].dtype}, "
                     f"{blocks} row chunk{'s' if blocks != 1 else ''} of {a.chunk_rows} cells")
        for slot in ("obs", "var"):
            cols = list(g[slot].attrs.get("column-order", []))
            lines.append(f"{head}{slot}: {', '.join(cols) or '(index only)'}")
        for slot in ("obsm", "varm", "obsp", "layers"):
            keys = a.keys(slot)
            if keys:
                lines.append(f"{head}{slot}: {', '.join(keys)}")
        for stage, rec in a.provenance().items():
            tot = rec.get("timings_s", {}).get("total")
            lines.append(f"{head}stage {stage}: {rec.get('finished_at')}"
                         + (f", {tot:.1f} s" if tot is not None else ""))
        runs = a.runs()
        if runs:
            last_id, last = list(runs.items())[-1]
            lines.append(f"{head}runs: {len(runs)}; last {last_id}: {last.get('status')}, "
                         f"{last.get('wall_s', 0):.1f} s, {len(last.get('stages', []))} stages")
    return "\n".join(lines)
