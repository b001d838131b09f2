"""Where the bytes of a .cnnp file go, and what entropy coding saves on each index stream.

For each file: the header, and the payload grouped by kind (SLBF banks, SLBF selection indices,
indices, BatchNorm, the uncompressed first conv and classifier, other arrays), from the
file's own manifest; then, per layer, the packed and the Huffman-coded size of every integer
stream of 2+ bits (SLBF selections, cluster indices) and the Shannon bound.

    python benchmarks/file_breakdown.py runs/compare-fmnist/slbf-100x-kd/model.cnnp \
        --out benchmarks/results/file_breakdown.json
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import cnnpress
from cnnpress.format import read_info
from cnnpress.format.layout import entropy_code, entropy_report, layout
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)


def kind(key: str, encoding: str) -> str:
    name = key.rsplit(".", 1)[-1]
    if name == "bank":
        return "slbf bank"
    if name == "indices":
        return "indices (SLBF selections, cluster indices)"
    if name == "positions":
        return "sparse positions"
    if name in ("scale", "shift", "running_mean", "running_var") or ".bn" in key:
        return "batchnorm"
    if encoding in ("f4", "f2"):
        return "floats (uncompressed layers, scales, biases)"
    return "other packed"


def breakdown(path: Path) -> dict:
    info = read_info(path)
    manifest = info["manifest"]
    model = cnnpress.load(path)
    entries = layout(
        model,
        manifest["float_bits"],
        with_values=True,
        fold_batchnorm=manifest.get("fold_batchnorm", False),
    )
    stored = entropy_code(entries) if any(a[0][0] == "h" for a in manifest["arrays"]) else entries
    encodings = [a[0] for a in manifest["arrays"]]
    if [e.encoding for e in stored] != encodings:
        raise SystemExit(f"{path}: the recomputed layout does not match the file's manifest")
    groups: dict[str, int] = defaultdict(int)
    for e in stored:
        groups[kind(e.key, e.encoding)] += e.nbytes
    payload = sum(groups.values())
    rows = entropy_report(entries)
    return {
        "file": str(path),
        "file_bytes": info["file_bytes"],
        "header_and_checksum_bytes": info["file_bytes"] - payload,
        "payload_bytes": payload,
        "payload_by_kind": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "index_streams": rows,
        "index_packed_bytes": sum(r["packed_bytes"] for r in rows),
        "index_stored_bytes": sum(r["stored_bytes"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = parser.parse_args()
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    results = [breakdown(p) for p in args.files]
    for r in results:
        print(f"\n{r['file']}: {r['file_bytes']:,} bytes")
        print(f"  header + checksum  {r['header_and_checksum_bytes']:>8,}")
        for k, v in r["payload_by_kind"].items():
            print(f"  {k:<45} {v:>8,}")
        if r["index_streams"]:
            print(f"  {'index stream':<28} bits  packed  huffman  H(bits)  saving")
            for s in r["index_streams"]:
                saving = 1 - s["stored_bytes"] / s["packed_bytes"]
                print(
                    f"  {s['array']:<28} {s['bits']:>4} {s['packed_bytes']:>7,} "
                    f"{s['huffman_bytes']:>8,} {s['entropy_bits']:>7.2f} {100 * saving:>6.1f}%"
                )
            total = 1 - r["index_stored_bytes"] / max(1, r["index_packed_bytes"])
            print(
                f"  all index streams: {r['index_packed_bytes']:,} -> "
                f"{r['index_stored_bytes']:,} bytes ({100 * total:.1f}% saved)"
            )
    write_result(args.out, {**script_provenance(args.out, args.allow_dirty), "files": results})


if __name__ == "__main__":
    main()
