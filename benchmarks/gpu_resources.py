"""Registers, spills and shared memory of every Triton kernel at every workload shape, for one
GPU architecture, from the ahead-of-time compile of gpu_compile.py (no GPU needed).

    PYTHONPATH=$PWD python benchmarks/gpu_resources.py [--arch 90] [--out benchmarks/results/gpu_resources_sm90.csv]

Registers, stack, shared and local memory come from ``cuobjdump -res-usage`` of the cubin, spill
stores and loads from ``ptxas -v`` of its PTX (both tools from the triton wheel; ptxas the one
triton itself uses for that architecture); num_warps and
the grid from the launch. Prints a table and writes the CSV.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

import gpu_compile  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
FIELDS = ["kernel", "shape", "arch", "grid", "num_warps", "registers", "spill_stores", "spill_loads", "stack",
          "shared_bytes", "local_bytes", "constexprs"]


def res_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED and LOCAL of the one kernel in ``cubin`` (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in found.items()}


def spills(ptx: str, arch: int) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) that ptxas reports for ``ptx``."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", str(src),
                              "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def rows(arch: int) -> list[dict]:
    out = []
    for r in gpu_compile.compile_all((arch,), progress=False):
        use = res_usage(r.binary.asm["cubin"])
        stores, loads = spills(r.binary.asm["ptx"], arch)
        consts = " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in r.constexprs.items())
        out.append(dict(kernel=r.kernel, shape=r.shape, arch=f"sm_{arch}", grid="x".join(map(str, r.grid)),
                        num_warps=r.binary.metadata.num_warps, registers=use.get("REG", 0), spill_stores=stores,
                        spill_loads=loads, stack=use.get("STACK", 0), shared_bytes=use.get("SHARED", 0),
                        local_bytes=use.get("LOCAL", 0), constexprs=consts))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/"
                                                              "gpu_resources_sm<arch>.csv)")
    args = parser.parse_args(argv)
    out = args.out or Path(__file__).parent / "results" / f"gpu_resources_sm{args.arch}.csv"
    table = rows(args.arch)
    print(f"{'kernel':28s} {'shape':40s} warps regs spill(st/ld) shared local")
    for r in table:
        print(f"{r['kernel']:28s} {r['shape']:40s} {r['num_warps']:5d} {r['registers']:4d} "
              f"{r['spill_stores']:5d}/{r['spill_loads']:<5d} {r['shared_bytes']:6d} {r['local_bytes']:5d}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(table)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
